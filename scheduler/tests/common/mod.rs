//! What the gRPC tests of this crate share: a real scheduler serving on `127.0.0.1:0` over an
//! in-memory store, and an agent's session on it.
#![allow(dead_code)] // each test binary uses its own part

use anyhow::{anyhow, bail, Context as _, Result};
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

pub struct Fixture {
    pub scheduler: Arc<Scheduler<MemoryStore>>,
    pub url: String,
    _stop: oneshot::Sender<()>,
}

pub async fn start(cluster_token: Option<&str>) -> Result<Fixture> {
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
    pub async fn client(&self) -> Result<AgentServiceClient<Channel>> {
        Ok(AgentServiceClient::new(
            Channel::from_shared(self.url.clone())?.connect().await?,
        ))
    }
}

/// A runner in fra running `command`.
pub fn runner_spec(name: &str, command: &str) -> berth_core::RunnerSpec {
    berth_core::RunnerSpec {
        name: name.into(),
        image_name: "busybox".into(),
        image_tag: "latest".into(),
        run_command: Some(command.into()),
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
    }
}

/// What a test agent registers with: a node in fra with 4 GiB and 4 run slots.
pub fn register(node_id: &str) -> pb::Register {
    pb::Register {
        node_id: node_id.to_owned(),
        boot_id: "boot-1".to_owned(),
        region: "fra".to_owned(),
        total_memory_mib: 4096,
        cpus: 2,
        max_concurrent_runs: 4,
        runtimes: vec!["runc".to_owned()],
        ..Default::default()
    }
}

/// An agent's session: what it sends, what it hears.
pub struct Session {
    pub to_scheduler: mpsc::UnboundedSender<pb::AgentMessage>,
    pub from_scheduler: tonic::Streaming<pb::SchedulerMessage>,
}

impl Session {
    /// Attaches as `node_id`, with `credential` if given, and waits for `Registered`.
    pub async fn attach(f: &Fixture, credential: Option<&str>, node_id: &str) -> Result<Session> {
        Session::attach_running(f, credential, node_id, vec![]).await
    }

    /// `attach`, for an agent that says it is running `active_run_ids`.
    pub async fn attach_running(
        f: &Fixture,
        credential: Option<&str>,
        node_id: &str,
        active_run_ids: Vec<String>,
    ) -> Result<Session> {
        let register = pb::Register {
            active_run_ids,
            ..register(node_id)
        };
        Session::attach_as(f, credential, register).await
    }

    /// `attach`, registering with `register` (e.g. [`register`] with more room).
    pub async fn attach_as(
        f: &Fixture,
        credential: Option<&str>,
        register: pb::Register,
    ) -> Result<Session> {
        let (to_scheduler, outbound) = mpsc::unbounded_channel();
        to_scheduler.send(pb::AgentMessage {
            seq: 0,
            body: Some(Body::Register(register)),
        })?;
        let mut request = tonic::Request::new(UnboundedReceiverStream::new(outbound));
        if let Some(credential) = credential {
            request.metadata_mut().insert(
                berth_core::auth::NODE_CREDENTIAL_METADATA,
                credential.parse()?,
            );
        }
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

    pub async fn next(&mut self) -> Result<Command> {
        let message = tokio::time::timeout(Duration::from_secs(10), self.from_scheduler.message())
            .await
            .context("nothing from the scheduler within 10 s")??;
        message
            .and_then(|m| m.body)
            .ok_or_else(|| anyhow!("the session ended"))
    }

    /// The next message that is not a warm pin set.
    pub async fn next_but_pins(&mut self) -> Result<Command> {
        loop {
            match self.next().await? {
                Command::WarmPins(_) => continue,
                other => return Ok(other),
            }
        }
    }

    /// Sends `body` as message `seq` and waits for its acknowledgement.
    pub async fn report(&mut self, seq: u64, body: Body) -> Result<()> {
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
