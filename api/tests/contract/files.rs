//! Files uploaded with a run and stop grace: bad input refused naming the field, the limits on
//! both sides. (That good files reach the container read-only: the end-to-end `files` test.)

use crate::harness::Api;
use anyhow::{ensure, Result};
use reqwest::Method;
use serde_json::{json, Value};

/// Standard base64 with padding (what the API takes), written here so the test depends on no
/// encoder of the code under test.
fn b64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= n {
                out.push(ABC[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// POSTs a run and returns (status, the fields its errors name).
async fn refused(f: &Api, runner: &str, body: Value) -> Result<(u16, Vec<String>)> {
    let (status, v) = f
        .request(
            Method::POST,
            &format!("/v1/runners/{runner}/runs"),
            Some(body),
        )
        .await?;
    let fields = v["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["field"].as_str().map(str::to_owned))
        .collect();
    Ok((status, fields))
}

#[tokio::test]
async fn bad_files_are_refused_naming_the_field() -> Result<()> {
    // No node: accepted runs stay pending, which is all this test needs.
    let f = Api::start().await?;
    let runner = f.runner("fra", json!({"run_command": "true"})).await?;
    let ok = b64(b"x");
    let file = |path: &str| json!({"path": path, "content_base64": ok});
    let one = |item: Value| json!({ "files": [item] });
    let path = "files[0].path".to_owned();
    for (body, status, field) in [
        (one(file("relative/x")), 422, path.clone()),
        (one(file("/")), 422, path.clone()),
        (one(file("/etc/")), 422, path.clone()),
        (one(file("/etc/../x")), 422, path.clone()),
        (one(file("/etc/./x")), 422, path.clone()),
        (one(file("/a//b")), 422, path.clone()),
        (one(file("/proc/x")), 422, path.clone()),
        (one(file("/sys/kernel/x")), 422, path.clone()),
        (one(file("/dev/x")), 422, path.clone()),
        (one(file("/a\u{0}b")), 422, path.clone()),
        (
            one(file(&format!("/{}", "a".repeat(4096)))),
            422,
            path.clone(),
        ),
        (
            json!({"files": [file("/x"), file("/x")]}),
            422,
            "files[1].path".to_owned(),
        ),
        (
            one(json!({"path": "/x", "content_base64": "not base64!"})),
            422,
            "files[0].content_base64".to_owned(),
        ),
        (
            one(json!({"path": "/x", "content_base64": "eA"})),
            422,
            "files[0].content_base64".to_owned(),
        ),
        (
            one(json!({"path": "/x", "content_base64": ok, "mode": 512})),
            422,
            "files[0].mode".to_owned(),
        ),
        (
            one(json!({"path": "/x", "content_base64": ok, "mode": -1})),
            422,
            "files[0].mode".to_owned(),
        ),
        (
            one(json!({"path": "/x", "content_base64": ok, "mode": "0755"})),
            400,
            "files[0].mode".to_owned(),
        ),
        (one(json!({"content_base64": ok})), 422, path.clone()),
        (
            one(json!({"path": "/x", "content": ok})),
            400,
            "files[0].content".to_owned(),
        ),
        (
            json!({"stop_grace_seconds": 0}),
            422,
            "stop_grace_seconds".to_owned(),
        ),
        (
            json!({"stop_grace_seconds": 301}),
            422,
            "stop_grace_seconds".to_owned(),
        ),
    ] {
        let got = refused(&f, &runner, body.clone()).await?;
        ensure!(
            got == (status, vec![field.clone()]),
            "{body}: expected {status} naming {field}, got {got:?}"
        );
    }

    // Count: 64 files pass, 65 do not.
    let many = |n: usize| {
        let files: Vec<Value> = (0..n).map(|i| file(&format!("/f/{i}"))).collect();
        json!({ "files": files })
    };
    ensure!(refused(&f, &runner, many(64)).await?.0 == 201);
    ensure!(refused(&f, &runner, many(65)).await? == (422, vec!["files".to_owned()]));
    // Size: exactly 1 MiB decoded passes (its JSON body is over 1.3 MB), one byte more does not.
    let sized = |a: usize, b: usize| {
        json!({"files": [
            {"path": "/a", "content_base64": b64(&vec![1u8; a])},
            {"path": "/b", "content_base64": b64(&vec![2u8; b])},
        ]})
    };
    let half = 512 * 1024;
    ensure!(refused(&f, &runner, sized(half, half)).await?.0 == 201);
    ensure!(refused(&f, &runner, sized(half, half + 1)).await? == (422, vec!["files".to_owned()]));
    // Grace boundaries: 1 and 300 pass.
    for g in [1, 300] {
        ensure!(
            refused(&f, &runner, json!({"stop_grace_seconds": g}))
                .await?
                .0
                == 201
        );
    }

    // A batch names the item.
    let (status, v) = f
        .request(
            Method::POST,
            &format!("/v1/runners/{runner}/runs/batch"),
            Some(json!({"runs": [{}, {"files": [file("/ok"), file("/proc/1")]}]})),
        )
        .await?;
    ensure!(
        status == 422 && v["errors"][0]["field"] == "runs[1].files[1].path",
        "{status} {v}"
    );
    // The runner's own grace is checked too.
    let (status, v) = f
        .request(
            Method::POST,
            "/v1/runners",
            Some(json!({
                "name": "grace", "image_name": "busybox", "image_tag": "latest",
                "region": "fra", "instance_type": "standard-s", "stop_grace_seconds": 301,
            })),
        )
        .await?;
    ensure!(
        status == 422 && v["errors"][0]["field"] == "stop_grace_seconds",
        "{status} {v}"
    );
    Ok(())
}
