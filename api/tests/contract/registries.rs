//! Private registries over HTTP: input validated naming the fields, and a runner must name an
//! existing one. (Pulling with the credentials: the end-to-end `registries` test.)

use crate::harness::Api;
use anyhow::{ensure, Result};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn registry_input_is_validated_and_runners_must_name_an_existing_one() -> Result<()> {
    let f = Api::start().await?;
    let (status, body) = f
        .request(
            Method::POST,
            "/v1/container_registries",
            Some(json!({"name": "x1y", "host": "not a host", "username": "u"})),
        )
        .await?;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["field"].as_str())
        .collect();
    ensure!(
        status == 422 && fields == ["password", "host"],
        "{status} {body}"
    );
    let (status, body) = f
        .request(
            Method::POST,
            "/v1/runners",
            Some(
                json!({"name": "needs-reg", "image_name": "app", "image_tag": "v1", "region": "fra",
                        "instance_type": "standard-s", "container_registry_id": "0000-missing"}),
            ),
        )
        .await?;
    ensure!(
        status == 422 && body["errors"][0]["field"] == "container_registry_id",
        "{status} {body}"
    );
    Ok(())
}
