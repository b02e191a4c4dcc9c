//! Reports about runs over a real `AgentService.Attach` stream: an agent's outbox sends them in
//! bursts, and the scheduler handles what arrived together as one operation, acknowledged once
//! it is stored. A report that contradicts its run's record is dropped, not left to block the
//! ones behind it.

mod common;

use anyhow::{bail, ensure, Result};
use berth_core::auth::DEFAULT_PROJECT;
use berth_core::RunStatus;
use berth_proto::v1 as pb;
use berth_proto::v1::agent_message::Body;
use berth_proto::v1::scheduler_message::Body as Command;
use common::{register, runner_spec, start, Session};

fn started(a: &pb::AssignRun) -> Body {
    Body::RunStarted(pb::RunStarted {
        run_id: a.run_id.clone(),
        lease_epoch: a.lease_epoch,
        started_at_unix_nanos: 1_000_000_000,
        ..Default::default()
    })
}

fn exited(a: &pb::AssignRun, reason: pb::ExitReason, error_code: pb::ErrorCode) -> Body {
    Body::RunExited(pb::RunExited {
        run_id: a.run_id.clone(),
        lease_epoch: a.lease_epoch,
        exit_code: 0,
        exited_at_unix_nanos: 2_000_000_000,
        reported_at_unix_nanos: 2_000_000_000,
        reason: reason.into(),
        error_code: error_code.into(),
        ..Default::default()
    })
}

/// A report the run's lifecycle refuses, in the middle of a burst: dropped and acknowledged
/// with the rest, so it cannot hold back the reports behind it (before, it ended the session
/// and came back after every reconnect: the node's reporting cycled on it for ever).
#[tokio::test]
async fn a_refused_report_in_a_burst_is_dropped_and_the_rest_is_acknowledged() -> Result<()> {
    let f = start(None).await?;
    let mut session = Session::attach(&f, None, "fra-1").await?;
    let (runner, _) = f
        .scheduler
        .create_runner(DEFAULT_PROJECT, runner_spec("reports", "true"))
        .await?;
    let mut assigned = Vec::new();
    for _ in 0..2 {
        f.scheduler
            .create_run(DEFAULT_PROJECT, &runner.id, Default::default())
            .await?;
        match session.next_but_pins().await? {
            Command::AssignRun(a) => assigned.push(a),
            other => bail!("expected an assignment, got {other:?}"),
        }
    }
    let (a1, a2) = (&assigned[0], &assigned[1]);
    // Sent at once, without waiting for acknowledgements. The fourth asks to put a running run
    // back in the queue (a refusal to start, after its start): the lifecycle refuses it.
    let burst = [
        started(a1),
        started(a2),
        exited(a1, pb::ExitReason::Exited, pb::ErrorCode::Unspecified),
        exited(a2, pb::ExitReason::StartFailed, pb::ErrorCode::NodeDraining),
        exited(a2, pb::ExitReason::Exited, pb::ErrorCode::Unspecified),
    ];
    for (seq, body) in (1..).zip(burst) {
        session.to_scheduler.send(pb::AgentMessage {
            seq,
            body: Some(body),
        })?;
    }
    let mut acked = 0;
    while acked < 5 {
        match session.next_but_pins().await {
            Ok(Command::Ack(a)) => acked = acked.max(a.up_to_seq),
            Ok(other) => bail!("unexpected {other:?}"),
            Err(e) => bail!("the session ended with {acked} acknowledged: {e:#}"),
        }
    }
    for a in [a1, a2] {
        let run = f
            .scheduler
            .get_run(DEFAULT_PROJECT, &runner.id, &a.run_id)
            .await?;
        ensure!(
            run.status == RunStatus::Succeeded,
            "run {} is {}, expected succeeded",
            a.run_id,
            run.status
        );
    }
    // The session goes on: a heartbeat after the burst is answered like any message.
    session
        .report(
            6,
            Body::Heartbeat(pb::Heartbeat {
                free_memory_mib: 4096,
                ..Default::default()
            }),
        )
        .await?;
    Ok(())
}

/// More reports at once than one operation takes (128): a node finishing 300 runs sends 600
/// reports in one go; every run ends succeeded and the last report is acknowledged.
#[tokio::test]
async fn a_burst_larger_than_one_batch_is_handled_whole() -> Result<()> {
    const RUNS: u64 = 300;
    let f = start(None).await?;
    let roomy = pb::Register {
        total_memory_mib: RUNS * 512,
        max_concurrent_runs: RUNS as u32,
        ..register("fra-1")
    };
    let mut session = Session::attach_as(&f, None, roomy).await?;
    let (runner, _) = f
        .scheduler
        .create_runner(
            DEFAULT_PROJECT,
            berth_core::RunnerSpec {
                instance_type: "standard-xs".into(),
                ..runner_spec("burst", "true")
            },
        )
        .await?;
    let mut assigned = Vec::new();
    for _ in 0..RUNS {
        f.scheduler
            .create_run(DEFAULT_PROJECT, &runner.id, Default::default())
            .await?;
        match session.next_but_pins().await? {
            Command::AssignRun(a) => assigned.push(a),
            other => bail!("expected an assignment, got {other:?}"),
        }
    }
    let burst = assigned.iter().flat_map(|a| {
        [
            started(a),
            exited(a, pb::ExitReason::Exited, pb::ErrorCode::Unspecified),
        ]
    });
    for (seq, body) in (1..).zip(burst) {
        session.to_scheduler.send(pb::AgentMessage {
            seq,
            body: Some(body),
        })?;
    }
    let last = 2 * RUNS;
    loop {
        match session.next_but_pins().await? {
            Command::Ack(a) if a.up_to_seq >= last => break,
            Command::Ack(_) => continue,
            other => bail!("expected acknowledgements, got {other:?}"),
        }
    }
    for a in &assigned {
        let run = f
            .scheduler
            .get_run(DEFAULT_PROJECT, &runner.id, &a.run_id)
            .await?;
        ensure!(
            run.status == RunStatus::Succeeded,
            "{}: {:?}",
            a.run_id,
            run.status
        );
    }
    Ok(())
}
