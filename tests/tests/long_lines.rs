//! End-to-end: long lines and binary output (issue 10, item 1, "bounded messages everywhere")
//! against the real scheduler, API, agent and containerd.
//!
//! The fault: 100 lines of 64 KiB (or one 10 MB line without a newline) made the agent send one
//! log batch above gRPC's 4 MiB message limit; the scheduler dropped the stream, the agent
//! re-registered and re-sent the same batch forever, the node sat `disconnected` with its run
//! stuck `running`; and `GET …/logs` answered 500 for pages of long lines. Here each run must
//! end `succeeded` with every byte of its output stored (long lines in pieces of 64 KiB, a
//! UTF-8 character never cut in two, invalid bytes as U+FFFD), the node must stay `ready` and
//! registered once, and the logs must page through everything with `limit` 100 and 1000.
//! A hand-made agent that does send a message above the limit (as an older agent did) is told
//! why by the scheduler, and the node's view shows it as `last_error` until it delivers again.
//! One that keeps doing so (registering, heartbeating, then failing, over and over) renews its
//! liveness each time but never delivers: it is declared `lost` after TTL + grace, its run ends
//! `node_lost`, and it stays lost while it goes on.

mod common;

use anyhow::{bail, ensure, Context, Result};
use berth_proto::v1 as pb;
use common::{AgentSpec, Fleet};
use serde_json::{json, Value};
use std::time::Duration;

/// The agent's piece size for long lines (`MAX_LINE_BYTES`).
const PIECE: usize = 64 * 1024;

/// Every line of a run through `GET …/logs?limit=…`, each page answered 200.
async fn pages(f: &Fleet, runner: &str, run: &str, limit: u32) -> Result<(Vec<Value>, usize)> {
    let mut out = Vec::new();
    let mut after = 0u64;
    let mut count = 0;
    loop {
        let v = f
            .get(&format!(
                "/v1/runners/{runner}/runs/{run}/logs?after_id={after}&limit={limit}"
            ))
            .await?;
        count += 1;
        let page = v["logs"].as_array().cloned().unwrap_or_default();
        ensure!(
            page.len() <= limit as usize,
            "a page of {} lines",
            page.len()
        );
        let next = v["next_after_id"].as_u64().context("no next_after_id")?;
        if let Some(last) = page.last() {
            ensure!(
                last["id"].as_u64() == Some(next),
                "next_after_id is the last id"
            );
        }
        ensure!(
            !page.is_empty() || v["has_more"] != json!(true),
            "an empty page with more to come"
        );
        after = next;
        out.extend(page);
        if v["has_more"] != json!(true) {
            return Ok((out, count));
        }
    }
}

fn texts(logs: &[Value], stream: &str) -> Vec<String> {
    logs.iter()
        .filter(|l| l["stream"] == stream)
        .filter_map(|l| l["msg"].as_str().map(str::to_owned))
        .collect()
}

/// Runs `command` on the runner, waits for its end and checks what every run here must hold:
/// `succeeded`, the node still `ready`, and the same lines through pages of 100 and 1,000.
async fn run_and_read(f: &Fleet, runner: &str, command: &str) -> Result<Vec<Value>> {
    let node = f.node("fra").to_owned();
    let run = f.start_run(runner, json!({ "command": command })).await?;
    let r = f.wait_finished(runner, &run).await?;
    ensure!(
        r["status"] == "succeeded",
        "{command:.60}: {r}\n{}",
        f.logs()
    );
    let view = f.node_view(&node).await?.context("node not listed")?;
    ensure!(view["status"] == "ready", "node after the run: {view}");
    let (small, small_pages) = pages(f, runner, &run, 100).await?;
    let (large, large_pages) = pages(f, runner, &run, 1000).await?;
    ensure!(small == large, "the same lines whatever the page size");
    let ids: Vec<u64> = small.iter().filter_map(|l| l["id"].as_u64()).collect();
    ensure!(
        ids == (1..=ids.len() as u64).collect::<Vec<_>>(),
        "ids 1..n in order"
    );
    let bytes: usize = small
        .iter()
        .map(|l| l["msg"].as_str().map_or(0, str::len))
        .sum();
    eprintln!(
        "{command:.50}: {} lines, {bytes} bytes of text; {small_pages} pages of ≤100, {large_pages} of ≤1000",
        small.len()
    );
    Ok(small)
}

/// The registrations the agent made so far (one per session).
fn registrations(f: &Fleet, node: &str) -> usize {
    std::fs::read_to_string(f.dir.path().join(format!("agent-{node}.log")))
        .unwrap_or_default()
        .matches("registered with scheduler")
        .count()
}

/// A fleet of one agent and a runner on it.
async fn fleet() -> Result<(Fleet, String)> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let runner = f
        .runner(
            "fra",
            json!({ "run_command": "true", "timeout_seconds": 60 }),
        )
        .await?;
    Ok((f, runner))
}

/// The node still serves another run, and it never had to reconnect.
async fn node_still_serves(f: &Fleet, runner: &str) -> Result<()> {
    let logs = run_and_read(f, runner, "echo still-works").await?;
    ensure!(texts(&logs, "stdout") == ["still-works"]);
    let node = f.node("fra");
    let sessions = registrations(f, node);
    ensure!(
        sessions == 1,
        "the agent registered {sessions} times\n{}",
        f.logs()
    );
    Ok(())
}

/// 100 lines of 64 KiB: 6.4 MiB, which a page of 100 lines (and a batch) used to hold at once.
#[tokio::test]
async fn a_hundred_lines_of_64_kib_are_stored_and_paged() -> Result<()> {
    let (f, runner) = fleet().await?;
    let logs = run_and_read(
        &f,
        &runner,
        "x=$(head -c 65536 /dev/zero | tr '\\0' a); i=0; \
         while [ $i -lt 100 ]; do echo \"$x\"; i=$((i+1)); done",
    )
    .await?;
    let out = texts(&logs, "stdout");
    ensure!(out.len() == 100, "{} lines", out.len());
    ensure!(out
        .iter()
        .all(|l| l.len() == PIECE && l.bytes().all(|b| b == b'a')));
    node_still_serves(&f, &runner).await
}

/// One 10 MiB line without a newline: 160 pieces, which used to go out as one 10 MB batch that
/// the scheduler refused, forever.
#[tokio::test]
async fn a_10_mib_line_without_a_newline_does_not_wedge_the_node() -> Result<()> {
    let (f, runner) = fleet().await?;
    let logs = run_and_read(&f, &runner, "head -c 10485760 /dev/zero | tr '\\0' c").await?;
    let out = texts(&logs, "stdout");
    ensure!(out.len() == 160, "{} pieces", out.len());
    ensure!(out.concat() == "c".repeat(10 << 20));
    node_still_serves(&f, &runner).await
}

/// Lines numbered while the scheduler was away and re-sent from the line log by a restarted
/// agent: an older agent re-sent them 256 to a message (here all 160 pieces of a 10 MiB line, one
/// message of 10 MB), so even an upgraded agent found the node wedged again after a restart.
#[tokio::test]
async fn a_restarted_agent_re_sends_a_long_line_in_bounded_messages() -> Result<()> {
    let (mut f, runner) = fleet().await?;
    let node = f.node("fra").to_owned();
    let run = f
        .start_run(
            &runner,
            json!({ "command": "sleep 2; head -c 10485760 /dev/zero | tr '\\0' d; sleep 4" }),
        )
        .await?;
    f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
        .await?;
    f.kill_scheduler()?;
    let line_log = f.run_state_dir(&node, &run).join("lines");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&line_log).map_or(0, |m| m.len()) < 10 << 20 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the line log never held the output\n{}",
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f.signal_agent(&node, "KILL")?;
    f.start_scheduler()?;
    f.restart_agent(&node)?;
    f.wait_ready().await?;
    let r = f.wait_finished(&runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}\n{}", f.logs());
    let (logs, _) = pages(&f, &runner, &run, 100).await?;
    let out = texts(&logs, "stdout");
    ensure!(out.len() == 160, "{} pieces", out.len());
    ensure!(out.concat() == "d".repeat(10 << 20));
    let agent_log = std::fs::read_to_string(f.dir.path().join(format!("agent-{node}.log")))?;
    ensure!(
        agent_log.contains("re-sending log lines not yet acknowledged"),
        "the restarted agent re-sent the lines from its line log"
    );
    let logs = run_and_read(&f, &runner, "echo still-works").await?;
    ensure!(texts(&logs, "stdout") == ["still-works"]);
    Ok(())
}

/// A 1 MiB line, a long line of two-byte characters whose cut would fall inside one, and
/// binary output.
#[tokio::test]
async fn a_1_mib_line_characters_and_binary_output_are_kept() -> Result<()> {
    let (f, runner) = fleet().await?;
    let logs = run_and_read(&f, &runner, "head -c 1048576 /dev/zero | tr '\\0' b; echo").await?;
    let out = texts(&logs, "stdout");
    ensure!(out.len() == 16 && out.iter().all(|l| l.len() == PIECE));
    ensure!(out.concat() == "b".repeat(1 << 20));

    let logs = run_and_read(
        &f,
        &runner,
        "s=é; i=0; while [ $i -lt 15 ]; do s=$s$s; i=$((i+1)); done; printf 'a%s\\n' \"$s\"",
    )
    .await?;
    let out = texts(&logs, "stdout");
    ensure!(
        out.concat() == format!("a{}", "é".repeat(1 << 15)),
        "pieces of {:?} bytes",
        out.iter().map(String::len).collect::<Vec<_>>()
    );

    // 1 MB of random bytes, then a line with invalid UTF-8 in it.
    let logs = run_and_read(
        &f,
        &runner,
        "head -c 1000000 /dev/urandom; printf '\\nok\\377\\376end\\n'",
    )
    .await?;
    let out = texts(&logs, "stdout");
    ensure!(out.len() > 1000, "{} lines of random bytes", out.len());
    ensure!(
        out.last().map(String::as_str) == Some("ok\u{fffd}\u{fffd}end"),
        "last line {:?}",
        out.last()
    );
    node_still_serves(&f, &runner).await
}

/// One session of a hand-made agent: registers as `node_id`, sends `messages`, and returns how
/// the stream ended: the first error status, or None if the scheduler acknowledged the last one.
async fn fake_session(
    f: &Fleet,
    node_id: &str,
    messages: Vec<pb::AgentMessage>,
) -> Result<Option<tonic::Status>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", f.scheduler_addr))?
        .connect()
        .await?;
    let credential: tonic::metadata::MetadataValue<_> =
        f.node_credential(node_id, "ams").await?.parse()?;
    let mut client = pb::agent_service_client::AgentServiceClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert(
                berth_core::auth::NODE_CREDENTIAL_METADATA,
                credential.clone(),
            );
            Ok(req)
        },
    );
    let register = pb::AgentMessage {
        seq: 0,
        body: Some(pb::agent_message::Body::Register(pb::Register {
            node_id: node_id.to_owned(),
            boot_id: "fake-boot".to_owned(),
            region: "ams".to_owned(),
            total_memory_mib: 1024,
            cpus: 1,
            max_concurrent_runs: 1,
            ..Default::default()
        })),
    };
    let last_seq = messages.last().map_or(0, |m| m.seq);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(register).await?;
    let mut inbound = client.attach(tokio_stream_from(rx)).await?.into_inner();
    for m in messages {
        tx.send(m).await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let next = tokio::time::timeout_at(deadline, inbound.message())
            .await
            .context("no answer from the scheduler")?;
        match next {
            Err(status) => return Ok(Some(status)),
            Ok(None) => bail!("the stream ended without an error"),
            Ok(Some(pb::SchedulerMessage {
                body: Some(pb::scheduler_message::Body::Ack(ack)),
            })) if ack.up_to_seq >= last_seq => return Ok(None),
            Ok(Some(_)) => {}
        }
    }
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<pb::AgentMessage>,
) -> impl futures::Stream<Item = pb::AgentMessage> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn log_batch(seq: u64, text_bytes: usize) -> pb::AgentMessage {
    pb::AgentMessage {
        seq,
        body: Some(pb::agent_message::Body::LogBatch(pb::LogBatch {
            run_id: "no-such-run".to_owned(),
            lines: vec![pb::LogLine {
                seq: 1,
                stream: pb::LogStream::Stdout as i32,
                msg: "x".repeat(text_bytes),
                ts_unix_nanos: 1,
            }],
        })),
    }
}

/// What an older agent did: a message above the scheduler's 4 MiB limit. The scheduler answers
/// why (not a bare end of stream) and the node's view says so until it delivers again.
#[tokio::test]
async fn an_oversized_agent_message_is_refused_with_its_reason_shown_on_the_node() -> Result<()> {
    let f = Fleet::start(&[]).await?;
    let node = "fake-old-agent";
    let ended = fake_session(&f, node, vec![log_batch(1, 5 << 20)]).await?;
    let status = ended.context("the oversized message was acknowledged")?;
    ensure!(
        status.message().contains("could not read a message")
            && status.message().contains("too large"),
        "the agent hears why: {status:?}"
    );
    let view = f.node_view(node).await?.context("node not listed")?;
    let error = view["last_error"].as_str().unwrap_or_default();
    ensure!(error.contains("too large"), "the node shows why: {view}");

    // Once it delivers a report, the error is history.
    let ended = fake_session(&f, node, vec![log_batch(2, 10)]).await?;
    ensure!(ended.is_none(), "a small batch is acknowledged: {ended:?}");
    let view = f.node_view(node).await?.context("node not listed")?;
    ensure!(view["last_error"].is_null(), "error cleared: {view}");
    Ok(())
}

/// One session of a hand-made agent that holds `run_id`: registers listing it, heartbeats, and,
/// on its first session, starts the run the scheduler assigns (acknowledged); then sends a
/// message above the scheduler's limit and returns once the scheduler ends the stream.
async fn failing_session(f: &Fleet, node_id: &str, run_id: &str, first: bool) -> Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", f.scheduler_addr))?
        .connect()
        .await?;
    let credential: tonic::metadata::MetadataValue<_> =
        f.node_credential(node_id, "ams").await?.parse()?;
    let mut client = pb::agent_service_client::AgentServiceClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert(
                berth_core::auth::NODE_CREDENTIAL_METADATA,
                credential.clone(),
            );
            Ok(req)
        },
    );
    let held = if first {
        vec![]
    } else {
        vec![run_id.to_owned()]
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::AgentMessage {
        seq: 0,
        body: Some(pb::agent_message::Body::Register(pb::Register {
            node_id: node_id.to_owned(),
            boot_id: "fake-boot".to_owned(),
            region: "ams".to_owned(),
            total_memory_mib: 4096,
            cpus: 2,
            max_concurrent_runs: 1,
            active_run_ids: held.clone(),
            ..Default::default()
        })),
    })
    .await?;
    let mut inbound = client.attach(tokio_stream_from(rx)).await?.into_inner();
    tx.send(pb::AgentMessage {
        seq: 0,
        body: Some(pb::agent_message::Body::Heartbeat(pb::Heartbeat {
            free_memory_mib: 1024,
            running_run_ids: held,
            cached_images: vec![],
        })),
    })
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    if first {
        // Take the lease and start the run, so the node holds a running run.
        loop {
            let next = tokio::time::timeout_at(deadline, inbound.message())
                .await
                .context("no assignment from the scheduler")?;
            match next? {
                Some(pb::SchedulerMessage {
                    body: Some(pb::scheduler_message::Body::AssignRun(a)),
                }) if a.run_id == run_id => {
                    tx.send(pb::AgentMessage {
                        seq: 1,
                        body: Some(pb::agent_message::Body::RunStarted(pb::RunStarted {
                            run_id: a.run_id,
                            lease_epoch: a.lease_epoch,
                            started_at_unix_nanos: 1,
                            image_digest: String::new(),
                            stages: None,
                            runtime: String::new(),
                        })),
                    })
                    .await?;
                }
                Some(pb::SchedulerMessage {
                    body: Some(pb::scheduler_message::Body::Ack(ack)),
                }) if ack.up_to_seq >= 1 => break,
                Some(_) => {}
                None => bail!("the stream ended before the run started"),
            }
        }
    }
    tx.send(log_batch(2, 5 << 20)).await?;
    loop {
        let next = tokio::time::timeout_at(deadline, inbound.message())
            .await
            .context("the scheduler never refused the oversized message")?;
        match next {
            Err(_) | Ok(None) => return Ok(()),
            Ok(Some(pb::SchedulerMessage {
                body: Some(pb::scheduler_message::Body::Ack(ack)),
            })) if ack.up_to_seq >= 2 => bail!("the oversized message was acknowledged"),
            Ok(Some(_)) => {}
        }
    }
}

/// The fault: an agent that re-registers forever without getting a report through renewed its
/// liveness each time, so its node was never `lost` and its run stayed `running` on it.
#[tokio::test]
async fn a_node_that_keeps_failing_to_deliver_is_declared_lost() -> Result<()> {
    let f = Fleet::start_with(
        &[],
        &["--node-ttl-seconds", "1", "--lost-grace-seconds", "1"],
    )
    .await?;
    let node = "fake-failing-agent";
    let runner = f.runner("ams", json!({})).await?;
    let run = f
        .start_run(&runner, json!({ "command": "sleep 600" }))
        .await?;
    failing_session(&f, node, &run, true).await?;
    let r = f.run(&runner, &run).await?;
    ensure!(r["status"] == "running", "the fake agent started it: {r}");

    // TTL + grace is 2 s; the node is checked twice a second. Give it 15 s of failing sessions.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut sessions = 1;
    let view = loop {
        failing_session(&f, node, &run, false).await?;
        sessions += 1;
        let view = f.node_view(node).await?.context("node not listed")?;
        if view["status"] == "lost" {
            break view;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "after {sessions} failing sessions the node is still not lost: {view}\n{}",
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let error = view["last_error"].as_str().unwrap_or_default();
    ensure!(error.contains("too large"), "the node shows why: {view}");
    let r = f.run(&runner, &run).await?;
    ensure!(
        r["status"] == "failed" && r["error_code"] == "node_lost",
        "its run ended node_lost: {r}"
    );

    // Registering again does not make it ready while it still cannot deliver.
    for _ in 0..3 {
        failing_session(&f, node, &run, false).await?;
        let view = f.node_view(node).await?.context("node not listed")?;
        ensure!(view["status"] == "lost", "still lost: {view}");
    }
    Ok(())
}
