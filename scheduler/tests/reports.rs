//! Reports about runs over a real `AgentService.Attach` stream: an agent's outbox sends them in
//! bursts, and the scheduler handles what arrived together as one operation. Its
//! acknowledgements must still cover exactly what is stored: when one report of a burst
//! cannot be handled, the ones before it are acknowledged, that one and those after it are not,
//! and the agent's re-send after reconnecting completes the run.

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

#[tokio::test]
async fn a_burst_of_reports_is_acknowledged_up_to_the_one_that_failed() -> Result<()> {
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
    loop {
        match session.next_but_pins().await {
            Ok(Command::Ack(a)) => acked = acked.max(a.up_to_seq),
            Ok(other) => bail!("unexpected {other:?}"),
            // The scheduler ends a session whose message it could not handle.
            Err(e) => {
                eprintln!("the session ended: {e:#}");
                break;
            }
        }
    }
    ensure!(acked == 3, "acknowledged up to {acked}, expected 3");
    let status = |id: String| {
        let f = &f;
        let runner = runner.id.clone();
        async move {
            anyhow::Ok(
                f.scheduler
                    .get_run(DEFAULT_PROJECT, &runner, &id)
                    .await?
                    .status,
            )
        }
    };
    ensure!(status(a1.run_id.clone()).await? == RunStatus::Succeeded);
    ensure!(status(a2.run_id.clone()).await? == RunStatus::Running);

    // The agent reconnects and sends what was not acknowledged; the bad report is its own bug,
    // the exit after it completes the run.
    drop(session);
    let mut session = Session::attach_running(&f, None, "fra-1", vec![a2.run_id.clone()]).await?;
    session
        .report(
            5,
            exited(a2, pb::ExitReason::Exited, pb::ErrorCode::Unspecified),
        )
        .await?;
    ensure!(status(a2.run_id.clone()).await? == RunStatus::Succeeded);
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
