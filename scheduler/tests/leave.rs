//! `AgentService.Leave` over gRPC, against the real scheduler serving on `127.0.0.1:0` (with a
//! cluster token, so node credentials are required): a node drains, is refused removal while
//! it holds a run (the count in the message and in `x-berth-active-runs`), is removed once the
//! run has ended, and cannot attach again with its old credential; another node's credential
//! and no credential are refused; a scheduler without a cluster token takes a leave without one.

use anyhow::{anyhow, bail, ensure, Context as _, Result};
use berth_core::store::MemoryStore;
use berth_proto::v1 as pb;
use berth_proto::v1::agent_message::Body;
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_proto::v1::scheduler_message::Body as Command;
use berth_scheduler::engine::{Config, Scheduler};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

const CLUSTER_TOKEN: &str = "leave-test-cluster-token-0123456789";

struct Fixture {
    scheduler: Arc<Scheduler<MemoryStore>>,
    url: String,
    _stop: oneshot::Sender<()>,
}

async fn start(cluster_token: Option<&str>) -> Result<Fixture> {
    let scheduler = Scheduler::open(MemoryStore::new(), Config::default()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(berth_scheduler::serve(
        scheduler.clone(),
        listener,
        berth_scheduler::ClusterGate::new(cluster_token),
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(Fixture {
        scheduler,
        url,
        _stop: stop,
    })
}

impl Fixture {
    async fn client(&self) -> Result<AgentServiceClient<Channel>> {
        Ok(AgentServiceClient::new(
            Channel::from_shared(self.url.clone())?.connect().await?,
        ))
    }

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

/// An agent's session: what it sends, what it hears.
struct Session {
    to_scheduler: mpsc::UnboundedSender<pb::AgentMessage>,
    from_scheduler: tonic::Streaming<pb::SchedulerMessage>,
}

impl Session {
    /// Attaches as `node_id` with `credential` and waits for `Registered`.
    async fn attach(f: &Fixture, credential: &str, node_id: &str) -> Result<Session> {
        let (to_scheduler, outbound) = mpsc::unbounded_channel();
        to_scheduler.send(pb::AgentMessage {
            seq: 0,
            body: Some(Body::Register(pb::Register {
                node_id: node_id.to_owned(),
                boot_id: "boot-1".to_owned(),
                region: "fra".to_owned(),
                total_memory_mib: 4096,
                cpus: 2,
                max_concurrent_runs: 4,
                runtimes: vec!["runc".to_owned()],
                ..Default::default()
            })),
        })?;
        let mut request = tonic::Request::new(UnboundedReceiverStream::new(outbound));
        request.metadata_mut().insert(
            berth_core::auth::NODE_CREDENTIAL_METADATA,
            credential.parse()?,
        );
        let from_scheduler = f.client().await?.attach(request).await?.into_inner();
        let mut session = Session {
            to_scheduler,
            from_scheduler,
        };
        match session.next().await? {
            Command::Registered(_) => Ok(session),
            other => bail!("expected Registered, got {other:?}"),
        }
    }

    async fn next(&mut self) -> Result<Command> {
        let message = tokio::time::timeout(Duration::from_secs(10), self.from_scheduler.message())
            .await
            .context("nothing from the scheduler within 10 s")??;
        message
            .and_then(|m| m.body)
            .ok_or_else(|| anyhow!("the session ended"))
    }

    /// The next message that is not a warm pin set.
    async fn next_but_pins(&mut self) -> Result<Command> {
        loop {
            match self.next().await? {
                Command::WarmPins(_) => continue,
                other => return Ok(other),
            }
        }
    }

    /// Sends `body` as message `seq` and waits for its acknowledgement.
    async fn report(&mut self, seq: u64, body: Body) -> Result<()> {
        self.to_scheduler.send(pb::AgentMessage {
            seq,
            body: Some(body),
        })?;
        loop {
            match self.next_but_pins().await? {
                Command::Ack(a) if a.up_to_seq >= seq => return Ok(()),
                Command::Ack(_) => continue,
                other => bail!("expected the ack of {seq}, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn a_node_leaves_drained_then_removed_and_cannot_attach_again() -> Result<()> {
    let f = start(Some(CLUSTER_TOKEN)).await?;
    let credential = f.enroll("fra-1").await?;
    let other = f.enroll("fra-2").await?;
    let mut session = Session::attach(&f, &credential, "fra-1").await?;

    let (runner, _) = f
        .scheduler
        .create_runner(
            berth_core::auth::DEFAULT_PROJECT,
            berth_core::RunnerSpec {
                name: "leave".into(),
                image_name: "busybox".into(),
                image_tag: "latest".into(),
                run_command: Some("sleep 60".into()),
                argv: vec![],
                entrypoint: None,
                timeout_seconds: 60,
                region: "fra".into(),
                instance_type: "standard-s".into(),
                env_variables: vec![],
                container_registry_id: None,
                stop_grace_seconds: None,
                max_concurrent_runs: None,
                retry_policy: None,
                notify: None,
                isolation: Default::default(),
            },
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
    let again = Session::attach(&f, &credential, "fra-1").await;
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
