//! End-to-end: TLS on the gRPC hops (issue #12, item 2). A fleet whose scheduler serves with a
//! certificate from `berthctl admin tls init` runs a job through the API and an agent that
//! verify it; a recording proxy between a second agent and the scheduler (a sniffer on the
//! hop) sees neither the registration token, nor the node credential, nor a run's secret,
//! though they all crossed it — and the same proxy on a plaintext hop does see the token and
//! the secret, so the sniffer works. An agent that trusts another CA never becomes a node.

mod common;

use anyhow::{ensure, Result};
use common::{AgentSpec, Fleet, FleetOptions, Killed};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "wire-s3cret-7731-value";

/// A TCP proxy on 127.0.0.1 to `target` that keeps every byte it forwards, both ways.
struct Sniffer {
    addr: String,
    seen: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sniffer {
    async fn start(target: String) -> Result<Sniffer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(pipe(ri, wo, recorded.clone()));
                tokio::spawn(pipe(ro, wi, recorded.clone()));
            }
        });
        Ok(Sniffer { addr, seen, task })
    }

    fn saw(&self, needle: &str) -> bool {
        self.seen
            .lock()
            .map(|seen| seen.windows(needle.len()).any(|w| w == needle.as_bytes()))
            .unwrap_or(false)
    }

    fn bytes(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or(0)
    }
}

/// Copies `from` to `to`, keeping a copy of every byte.
async fn pipe(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    recorded: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if let Ok(mut seen) = recorded.lock() {
            seen.extend_from_slice(&buf[..n]);
        }
    }
    let _ = to.shutdown().await;
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An agent outside the fleet, in `ams`, reaching the scheduler at `scheduler`.
fn spawn_agent(
    f: &Fleet,
    name: &str,
    node_id: &str,
    scheduler: &str,
    extra: &[&str],
) -> Result<Killed> {
    f.spawn_loose_agent(name, node_id, "ams", scheduler, extra)
}

async fn wait_ready(f: &Fleet, node: &str, log: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view = f.node_view(node).await?;
        if view.as_ref().is_some_and(|v| v["status"] == "ready") {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{node} did not become ready: {view:?}\n{}",
            std::fs::read_to_string(f.dir.path().join(format!("{log}.log")))?
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Enrolls an agent through the sniffer, runs a job with a secret on it, and answers what
/// crossed the hop in clear: (token, credential, secret) seen, and the bytes recorded.
async fn through_a_sniffer(f: &Fleet, scheme: &str) -> Result<([bool; 3], usize)> {
    let sniffer = Sniffer::start(f.scheduler_addr.clone()).await?;
    let token_file = f.registration_token_file("ams").await?;
    let token = std::fs::read_to_string(&token_file)?.trim().to_owned();
    let node = format!("sniffed-{scheme}");
    let url = format!("{scheme}://{}", sniffer.addr);
    let mut extra = vec![
        "--registration-token-file".to_owned(),
        token_file.to_string_lossy().into_owned(),
    ];
    extra.extend(f.tls_ca_args());
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let _agent = spawn_agent(f, &node, &node, &url, &extra)?;
    wait_ready(f, &node, &node).await?;
    let runner = f
        .runner(
            "ams",
            json!({
                "run_command": "echo token=$API_TOKEN",
                "env_variables": [{"env_key": "API_TOKEN", "env_val": SECRET, "secret": true}],
            }),
        )
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(
        r["status"] == "succeeded" && r["node_id"] == node.as_str(),
        "{r}"
    );
    let credential = std::fs::read_to_string(
        f.dir
            .path()
            .join(format!("{node}-state"))
            .join("node.credential"),
    )?
    .trim()
    .to_owned();
    Ok((
        [
            sniffer.saw(&token),
            sniffer.saw(&credential),
            sniffer.saw(SECRET),
        ],
        sniffer.bytes(),
    ))
}

#[tokio::test]
async fn over_tls_a_sniffer_on_the_hop_sees_no_token_credential_or_secret() -> Result<()> {
    let f = Fleet::start_opts(
        &[AgentSpec::new("fra")],
        FleetOptions {
            tls: true,
            ..Default::default()
        },
    )
    .await?;
    ensure!(
        f.scheduler_urls().starts_with("https://"),
        "{}",
        f.scheduler_urls()
    );
    // The fleet's own agent and the API work over TLS.
    let runner = f
        .runner("fra", json!({"run_command": "echo over-tls"}))
        .await?;
    let run = f.start_run(&runner, json!({})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}");

    let (seen, bytes) = through_a_sniffer(&f, "https").await?;
    // A handshake with certificates, a registration, heartbeats, a spec and a log batch.
    ensure!(bytes > 2_000, "the sniffer recorded only {bytes} bytes");
    ensure!(
        seen == [false; 3],
        "seen in clear on a TLS hop (token, credential, secret): {seen:?}"
    );

    // An agent that trusts another CA refuses the scheduler and never becomes a node.
    let other = f.dir.path().join("other-ca");
    f.tls_init(&other)?;
    let token_file = f.registration_token_file("ams").await?;
    let _stranger = spawn_agent(
        &f,
        "stranger",
        "stranger",
        &f.scheduler_urls(),
        &[
            "--registration-token-file",
            &token_file.to_string_lossy(),
            "--tls-ca",
            &other.join("ca.pem").to_string_lossy(),
        ],
    )?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        f.node_view("stranger").await?.is_none(),
        "a node trusting another CA joined"
    );
    let log = std::fs::read_to_string(f.dir.path().join("stranger.log"))?;
    ensure!(log.contains("could not enroll yet"), "{log}");

    // Plaintext to a non-loopback address is refused at start.
    let out = std::process::Command::new(f.env.bin_dir.join("berth-node-agent"))
        .args([
            "--scheduler",
            "http://192.0.2.1:7070",
            "--node-id",
            "x",
            "--region",
            "ams",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("plaintext"),
        "{}: {err}",
        out.status
    );
    Ok(())
}

/// The control: the same sniffer on a plaintext hop sees all three, so the TLS test's "seen
/// nothing" is the encryption's doing.
#[tokio::test]
async fn on_a_plaintext_hop_the_same_sniffer_sees_them_all() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let (seen, _) = through_a_sniffer(&f, "http").await?;
    // The token and the secret travel in protobuf bodies, byte for byte. The credential travels
    // in a header, which HTTP/2 compresses (HPACK's Huffman code), so it is not there verbatim
    // even in plaintext: on the TLS hop its absence proves nothing by itself, the other two do.
    ensure!(seen[0] && seen[2], "plaintext, yet not seen: {seen:?}");
    Ok(())
}
