//! `AgentService.Leave` over gRPC, against the real scheduler serving on `127.0.0.1:0` (with a
//! cluster token, so node credentials are required): a node drains, is refused removal while
//! it holds a run (the count in the message and in `x-berth-active-runs`), is removed once the
//! run has ended, and cannot attach again with its old credential; another node's credential
//! and no credential are refused; a scheduler without a cluster token takes a leave without one.

mod common;

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use berth_proto::v1 as pb;
use berth_proto::v1::agent_message::Body;
use berth_proto::v1::scheduler_message::Body as Command;
use common::{runner_spec, start, Fixture, Session};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

const CLUSTER_TOKEN: &str = "leave-test-cluster-token-0123456789";

impl Fixture {
    /// Enrolls `node_id` in fra through `Enroll`; answers its credential.
    async fn enroll(&self, node_id: &str) -> Result<String> {
        let (_, token) = self
            .scheduler
            .create_registration_token("fra", "test", None, true)
            .await?;
        let answer = self
            .client()
            .await?
            .enroll(pb::EnrollRequest {
                registration_token: token,
                node_id: node_id.to_owned(),
                region: "fra".to_owned(),
            })
            .await?;
        Ok(answer.into_inner().node_credential)
    }

    async fn leave(
        &self,
        credential: Option<&str>,
        node_id: &str,
        remove: bool,
    ) -> Result<pb::LeaveResponse, tonic::Status> {
        let mut request = tonic::Request::new(pb::LeaveRequest {
            node_id: node_id.to_owned(),
            remove,
        });
        if let Some(c) = credential {
            request.metadata_mut().insert(
                berth_core::auth::NODE_CREDENTIAL_METADATA,
                c.parse()
                    .map_err(|_| tonic::Status::internal("credential"))?,
            );
        }
        let mut client = self
            .client()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        client.leave(request).await.map(tonic::Response::into_inner)
    }
}

#[tokio::test]
async fn a_node_leaves_drained_then_removed_and_cannot_attach_again() -> Result<()> {
    let f = start(Some(CLUSTER_TOKEN)).await?;
    let credential = f.enroll("fra-1").await?;
    let other = f.enroll("fra-2").await?;
    let mut session = Session::attach(&f, Some(&credential), "fra-1").await?;

    let (runner, _) = f
        .scheduler
        .create_runner(
            berth_core::auth::DEFAULT_PROJECT,
            runner_spec("leave", "sleep 60"),
        )
        .await?;
    f.scheduler
        .create_run(
            berth_core::auth::DEFAULT_PROJECT,
            &runner.id,
            Default::default(),
        )
        .await?;
    let assigned = match session.next_but_pins().await? {
        Command::AssignRun(a) => a,
        other => bail!("expected an assignment, got {other:?}"),
    };
    session
        .report(
            1,
            Body::RunStarted(pb::RunStarted {
                run_id: assigned.run_id.clone(),
                lease_epoch: assigned.lease_epoch,
                started_at_unix_nanos: 1_000_000_000,
                ..Default::default()
            }),
        )
        .await?;

    // Without a credential, and with another node's.
    let refused = f
        .leave(None, "fra-1", false)
        .await
        .expect_err("no credential");
    ensure!(
        refused.code() == tonic::Code::Unauthenticated,
        "{refused:?}"
    );
    let refused = f
        .leave(Some(&other), "fra-1", true)
        .await
        .expect_err("another node's credential");
    ensure!(
        refused.code() == tonic::Code::PermissionDenied && refused.message().contains("fra-2"),
        "{refused:?}"
    );

    let drained = f.leave(Some(&credential), "fra-1", false).await?;
    ensure!(
        (drained.active_runs, drained.removed) == (1, false),
        "{drained:?}"
    );
    let nodes = f.scheduler.list_nodes().await;
    ensure!(nodes.len() == 1 && nodes[0].draining, "drained");
    let refused = f
        .leave(Some(&credential), "fra-1", true)
        .await
        .expect_err("it holds a run");
    ensure!(
        refused.code() == tonic::Code::FailedPrecondition
            && refused.message().contains("still holds 1 run"),
        "{refused:?}"
    );
    ensure!(
        refused
            .metadata()
            .get(berth_scheduler::error::ACTIVE_RUNS_METADATA)
            .and_then(|v| v.to_str().ok())
            == Some("1"),
        "the count in the metadata: {:?}",
        refused.metadata()
    );

    session
        .report(
            2,
            Body::RunExited(pb::RunExited {
                run_id: assigned.run_id.clone(),
                lease_epoch: assigned.lease_epoch,
                exit_code: 0,
                exited_at_unix_nanos: 2_000_000_000,
                reason: pb::ExitReason::Exited.into(),
                ..Default::default()
            }),
        )
        .await?;
    let idle = f.leave(Some(&credential), "fra-1", false).await?;
    ensure!((idle.active_runs, idle.removed) == (0, false), "{idle:?}");
    let removed = f.leave(Some(&credential), "fra-1", true).await?;
    ensure!(
        (removed.active_runs, removed.removed) == (0, true),
        "{removed:?}"
    );
    ensure!(f.scheduler.list_nodes().await.is_empty(), "not listed");

    // Its session was closed, and its credential no longer attaches.
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), session.from_scheduler.message())
            .await
            .context("the session was not closed")?
        {
            Ok(Some(_)) => continue,
            Ok(None) => bail!("the session ended without saying why"),
            Err(status) => break status,
        }
    };
    ensure!(
        closed.code() == tonic::Code::Unauthenticated && closed.message().contains("removed"),
        "{closed:?}"
    );
    let again = Session::attach(&f, Some(&credential), "fra-1").await;
    let status = again
        .err()
        .and_then(|e| e.downcast::<tonic::Status>().ok())
        .ok_or_else(|| anyhow!("attached again with a revoked credential"))?;
    ensure!(status.code() == tonic::Code::Unauthenticated, "{status:?}");
    ensure!(
        f.scheduler.list_nodes().await.is_empty(),
        "still not listed"
    );

    // Leaving again: the node is gone.
    let gone = f
        .leave(Some(&credential), "fra-1", true)
        .await
        .expect_err("removed already");
    ensure!(gone.code() == tonic::Code::NotFound, "{gone:?}");
    Ok(())
}

/// Without a cluster token (loopback development), agents carry no credential, and neither
/// does their leave; a node the scheduler does not know is not found.
#[tokio::test]
async fn without_a_cluster_token_a_node_leaves_without_a_credential() -> Result<()> {
    let f = start(None).await?;
    let unknown = f.leave(None, "fra-1", false).await.expect_err("unknown");
    ensure!(unknown.code() == tonic::Code::NotFound, "{unknown:?}");
    // A node registered without a credential.
    let (to_scheduler, outbound) = mpsc::unbounded_channel();
    to_scheduler.send(pb::AgentMessage {
        seq: 0,
        body: Some(Body::Register(pb::Register {
            node_id: "fra-1".into(),
            boot_id: "b".into(),
            region: "fra".into(),
            total_memory_mib: 1024,
            cpus: 1,
            max_concurrent_runs: 1,
            ..Default::default()
        })),
    })?;
    let mut inbound = f
        .client()
        .await?
        .attach(UnboundedReceiverStream::new(outbound))
        .await?
        .into_inner();
    ensure!(
        matches!(
            inbound.message().await?.and_then(|m| m.body),
            Some(Command::Registered(_))
        ),
        "registered"
    );
    let bad = f.leave(None, "../x", false).await.expect_err("bad id");
    ensure!(bad.code() == tonic::Code::InvalidArgument, "{bad:?}");
    let drained = f.leave(None, "fra-1", false).await?;
    ensure!((drained.active_runs, drained.removed) == (0, false));
    let removed = f.leave(None, "fra-1", true).await?;
    ensure!(removed.removed);
    ensure!(f.scheduler.list_nodes().await.is_empty());
    drop(to_scheduler);
    Ok(())
}
