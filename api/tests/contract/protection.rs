//! The API protects itself (issue #10, item 4): header and body read timeouts, a connection cap
//! that an idle flood cannot use to lock out others, 413 for oversized bodies, trailing data
//! after the JSON body refused, the `Bearer` scheme in any case, a cap on log streams per key;
//! and (item 5) a scheduler that drops its connections makes 503s, never 500s.
//! Every client here is raw TCP or reqwest on loopback, bounded in count and time.

use crate::harness::{Api, TOKEN};
use anyhow::{ensure, Context, Result};
use berth_api::ServeLimits;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Waits (at most `within`) for the server to close `stream`; what it sent before is returned.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> Result<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => anyhow::bail!(
                "the server kept the connection open for {within:?}; it sent {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn short(header: Duration, body: Duration) -> ServeLimits {
    ServeLimits {
        header_read_timeout: header,
        body_read_timeout: body,
        ..ServeLimits::default()
    }
}

#[tokio::test]
async fn idle_and_slow_header_connections_are_closed_after_the_header_timeout() -> Result<()> {
    let f = Api::start_with(short(Duration::from_secs(1), Duration::from_secs(30)), None).await?;
    let mut idle = TcpStream::connect(f.api_addr()).await?;
    let mut slow = TcpStream::connect(f.api_addr()).await?;
    slow.write_all(b"GET /v1/runners HTTP/1.1\r\nHost: x\r\n")
        .await?;
    let started = Instant::now();
    // A header trickling in, a byte at a time, does not extend the deadline either.
    let trickle = async {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow.write_all(b"X").await.is_err() {
                break;
            }
        }
    };
    trickle.await;
    closed_by_server(&mut slow, Duration::from_secs(5))
        .await
        .context("slow header")?;
    closed_by_server(&mut idle, Duration::from_secs(5))
        .await
        .context("idle connection")?;
    ensure!(started.elapsed() < Duration::from_secs(10));

    // A keep-alive connection left idle after a response is closed as well.
    let mut kept = TcpStream::connect(f.api_addr()).await?;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let answer = closed_by_server(&mut kept, Duration::from_secs(5))
        .await
        .context("idle keep-alive")?;
    ensure!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    Ok(())
}

#[tokio::test]
async fn a_slow_body_is_answered_408_and_its_connection_closed() -> Result<()> {
    let f = Api::start_with(short(Duration::from_secs(5), Duration::from_secs(1)), None).await?;
    let mut s = TcpStream::connect(f.api_addr()).await?;
    let head = format!(
        "POST /v1/runners HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"name\": "
    );
    s.write_all(head.as_bytes()).await?;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(b" ").await?;
    }
    let answer = closed_by_server(&mut s, Duration::from_secs(10)).await?;
    ensure!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    ensure!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    Ok(())
}

#[tokio::test]
async fn an_idle_flood_cannot_lock_out_authenticated_requests() -> Result<()> {
    const CAP: usize = 32;
    const FLOOD: usize = 400;
    let limits = ServeLimits {
        max_connections: CAP,
        // Long: only the cap, not the timeout, may close the flood here.
        header_read_timeout: Duration::from_secs(120),
        ..ServeLimits::default()
    };
    let f = Api::start_with(limits, None).await?;
    let mut flood = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let mut s = TcpStream::connect(f.api_addr()).await?;
        if i % 2 == 1 {
            // Half of them slow headers, the other half silent.
            s.write_all(b"GET / HTTP/1.1\r\n").await?;
        }
        flood.push(s);
    }
    // A fresh connection for each request, as a new client would open.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()?;
    for i in 0..20 {
        let res = client
            .get(format!("{}/v1/runners", f.api_url))
            .header("authorization", format!("Bearer {TOKEN}"))
            .send()
            .await
            .with_context(|| format!("request {i} during the flood"))?;
        ensure!(res.status() == 200, "request {i}: {}", res.status());
        // More flood between the requests.
        for _ in 0..CAP {
            flood.push(TcpStream::connect(f.api_addr()).await?);
        }
    }
    // Of everything the flood opened, at most the cap is still open.
    let mut open = 0;
    for s in &mut flood {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(20), s.read(&mut buf)).await {
            Err(_) => open += 1,
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(_)) => open += 1,
        }
    }
    ensure!(
        open <= CAP,
        "{open} flood connections still open, cap {CAP}"
    );
    Ok(())
}

#[tokio::test]
async fn an_oversized_body_is_413_with_the_json_error() -> Result<()> {
    let f = Api::start().await?;
    let big = json!({"name": "x".repeat(berth_api::body::MAX_BODY_BYTES)});
    let (status, v) = f
        .request(reqwest::Method::POST, "/v1/runners", Some(big))
        .await?;
    ensure!(status == 413, "{status} {v}");
    ensure!(v["code"] == "payload_too_large", "{v}");
    ensure!(v["errors"][0]["field"] == "body", "{v}");
    Ok(())
}

#[tokio::test]
async fn trailing_data_after_the_json_body_is_400() -> Result<()> {
    let f = Api::start().await?;
    let good = r#"{"name": "trail", "image_name": "busybox", "image_tag": "latest", "region": "fra", "instance_type": "standard-s"}"#;
    for (body, want) in [
        (format!("{good}\n"), 201),
        (format!("{good}{good}"), 400),
        (format!("{good} garbage"), 400),
    ] {
        let res = f
            .http
            .post(format!("{}/v1/runners", f.api_url))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        let status = res.status().as_u16();
        let v: Value = res.json().await.unwrap_or(Value::Null);
        ensure!(status == want, "{body:?}: {status} {v}");
        if want == 400 {
            ensure!(v["code"] == "malformed_request", "{v}");
        }
    }
    Ok(())
}

/// A run's body is optional: no bytes at all start the runner as it is. A body of only
/// whitespace is not a JSON document, so it is refused like any other malformed body (found by
/// schemathesis sending `"\r"`).
#[tokio::test]
async fn a_run_body_of_only_whitespace_is_400_and_no_body_is_201() -> Result<()> {
    let f = Api::start().await?;
    let runner = f.runner("fra", json!({})).await?;
    for (body, want) in [("\r", 400), (" \n\t", 400), ("", 201), ("null", 201)] {
        let res = f
            .http
            .post(format!("{}/v1/runners/{runner}/runs", f.api_url))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = res.status().as_u16();
        let v: Value = res.json().await.unwrap_or(Value::Null);
        ensure!(status == want, "{body:?}: {status} {v}");
        if want == 400 {
            ensure!(
                v["code"] == "malformed_request" && v["errors"][0]["field"] == "body",
                "{v}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn the_bearer_scheme_is_matched_in_any_case() -> Result<()> {
    let f = Api::start().await?;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let res = f
            .http
            .get(format!("{}/v1/runners", f.api_url))
            .header("authorization", format!("{scheme} {TOKEN}"))
            .send()
            .await?;
        ensure!(res.status() == 200, "{scheme}: {}", res.status());
    }
    Ok(())
}

#[tokio::test]
async fn log_streams_per_key_are_capped_with_429() -> Result<()> {
    let f = Api::start_with(ServeLimits::default(), Some(2)).await?;
    let runner = f.runner("fra", json!({})).await?;
    // No node: the run stays pending, and its stream stays open.
    let run = f.start_run(&runner, json!({})).await?;
    let url = format!("{}/v1/runners/{runner}/runs/{run}/logs/stream", f.api_url);
    let open = || f.http.get(&url).bearer_auth(TOKEN).send();
    let first = open().await?;
    let second = open().await?;
    ensure!(first.status() == 200 && second.status() == 200);
    let third = open().await?;
    ensure!(third.status() == 429, "{}", third.status());
    let v: Value = third.json().await?;
    ensure!(v["code"] == "too_many_requests", "{v}");
    // Closing one frees its place (the server notices at its next write, a keep-alive at most).
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let again = open().await?;
        if again.status() == 200 {
            break;
        }
        ensure!(Instant::now() < deadline, "the closed stream still counts");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(second);
    Ok(())
}

/// A scheduler that accepts connections and drops them, as one killed mid-call does: every
/// answer is 503 `unavailable`, never 500 (each after the failover budget: these are reads,
/// tried again until it is spent).
#[tokio::test]
async fn a_scheduler_dropping_connections_makes_503_not_500() -> Result<()> {
    let broken = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let scheduler = broken.local_addr()?;
    let dropper = tokio::spawn(async move {
        while let Ok((mut s, _)) = broken.accept().await {
            // Read the client's preface and first frames, then vanish mid-call.
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await;
            drop(s);
        }
    });
    let schedulers = berth_core::failover::SchedulerAddrs::parse(&format!("http://{scheduler}"))?;
    let cluster = berth_api::auth::ClusterToken::new(None)?;
    let state = berth_api::AppState::new(&schedulers, TOKEN, cluster);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(berth_api::serve(state, listener, async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    for path in ["/v1/runners", "/v1/nodes", "/v1/runners/abc"] {
        {
            let res = http
                .get(format!("{url}{path}"))
                .bearer_auth(TOKEN)
                .send()
                .await?;
            let status = res.status().as_u16();
            let v: Value = res.json().await?;
            ensure!(status == 503, "{path}: {status} {v}");
            ensure!(v["code"] == "unavailable", "{v}");
        }
    }
    let _ = stop.send(());
    dropper.abort();
    Ok(())
}
