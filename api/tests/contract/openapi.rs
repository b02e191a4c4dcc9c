//! The OpenAPI document as served: without the token, and the same document the route table is
//! checked against.

use crate::harness::Api;
use anyhow::{ensure, Result};
use reqwest::Method;
use serde_json::json;

/// The document is served without the token and lists the routes clients use.
#[tokio::test]
async fn the_openapi_document_is_served_without_the_token() -> Result<()> {
    let f = Api::start().await?;
    let res = f
        .http
        .get(format!("{}/v1/openapi.json", f.api_url))
        .send()
        .await?;
    ensure!(res.status() == 200, "{}", res.status());
    let doc: serde_json::Value = res.json().await?;
    ensure!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    for (path, method) in [
        ("/v1/runners", "post"),
        ("/v1/runners/{id}/runs", "post"),
        ("/v1/runners/{id}/runs/{run_id}/logs/stream", "get"),
    ] {
        ensure!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
    Ok(())
}

/// The served document is the one the unit tests check against the route table, and every
/// route of the table answers over HTTP (an unknown one would be `no such route`).
#[tokio::test]
async fn the_served_document_is_the_checked_one_and_every_route_is_served() -> Result<()> {
    let f = Api::start().await?;
    let served: serde_json::Value = f
        .http
        .get(format!("{}/v1/openapi.json", f.api_url))
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        &served == berth_api::openapi::document(),
        "the served document differs"
    );
    for r in berth_api::routes() {
        let method = Method::from_bytes(r.verb.as_str().to_uppercase().as_bytes())?;
        let path = r
            .path
            .replace("{id}", "no-such-id")
            .replace("{run_id}", "no-such-run")
            .replace("{key_id}", "ffffffffffffffff");
        let body = (method != Method::GET && method != Method::DELETE).then(|| json!({}));
        let (status, v) = f.request(method.clone(), &path, body).await?;
        ensure!(
            !(status == 404 && v["errors"][0]["message"] == "no such route") && status != 405,
            "{method} {path}: {status} {v}"
        );
    }
    Ok(())
}
