//! `AgentService`: one bidirectional stream per connected agent, and the one place where the
//! agent protocol's gRPC forms meet the engine's domain types ([`berth_core::agent`]): each
//! incoming message is decoded once, moving its fields, into a [`Registration`] or an
//! [`AgentReport`]; each [`AgentCommand`] the engine sends is encoded once, on its way out,
//! by [`GrpcLink`]. Sequence numbers and their acks are this stream's business only.

use crate::engine::{Link, Scheduler};
use berth_core::agent::{
    AgentCommand, AgentLink, AgentReport, AssignRun, ExitReason, Heartbeat, LinkClosed, LogBatch,
    LogLine, PullFor, PullProgress, Registered, Registration, RegistryAuth, RunExited, RunSpec,
    RunStarted, Warmup, WarmupResult,
};
use berth_core::model::{ImagePull, LogStream};
use berth_core::store::Store;
use berth_proto::v1 as pb;
use berth_proto::v1::agent_message::Body;
use berth_proto::v1::scheduler_message::Body as Command;
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

pub struct AgentApi<S> {
    pub scheduler: Arc<Scheduler<S>>,
}

type Outbound = Pin<Box<dyn Stream<Item = Result<pb::SchedulerMessage, Status>> + Send>>;

/// The engine's way to one agent: the sending half of its stream. A command is encoded when it
/// is sent (after its operation is durable), outside the engine's lock.
#[derive(Clone)]
pub struct GrpcLink {
    tx: mpsc::UnboundedSender<pb::SchedulerMessage>,
}

impl AgentLink for GrpcLink {
    fn send(&self, command: AgentCommand) -> Result<(), LinkClosed> {
        self.tx.send(command_to_pb(command)).map_err(|_| LinkClosed)
    }
}

#[tonic::async_trait]
impl<S: Store> pb::agent_service_server::AgentService for AgentApi<S> {
    type AttachStream = Outbound;

    async fn attach(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let register = match inbound.message().await?.and_then(|m| m.body) {
            Some(Body::Register(r)) => registration_from_pb(r),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be Register",
                ))
            }
        };
        let node_id = register.node_id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let link: Link = Arc::new(GrpcLink { tx: tx.clone() });
        let connection = self.scheduler.attach_node(register, link).await?;
        // The reader records liveness the moment a message arrives, whatever it is and however
        // long the engine takes with the messages before it; the processor handles them in
        // order. A busy scheduler therefore never mistakes a healthy node for a lost one.
        let (queue, mut queued) = mpsc::unbounded_channel::<pb::AgentMessage>();
        let reader_scheduler = self.scheduler.clone();
        let reader_node = node_id.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        reader_scheduler.touch(&reader_node, std::time::Instant::now());
                        if queue.send(msg).is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(node_id = %reader_node, error = %e, "agent stream failed");
                        break;
                    }
                }
            }
        });
        let scheduler = self.scheduler.clone();
        tokio::spawn(async move {
            while let Some(msg) = queued.recv().await {
                let seq = msg.seq;
                let handled = match msg.body.and_then(report_from_pb) {
                    Some(report) => scheduler.report(&node_id, report).await,
                    None => {
                        tracing::warn!(node_id = %node_id, "unexpected message on an attached stream");
                        Ok(())
                    }
                };
                if let Err(e) = handled {
                    // Not acknowledged: end the stream so the agent reconnects and re-sends.
                    tracing::error!(node_id = %node_id, seq, error = %e, "could not handle agent message");
                    break;
                }
                if seq > 0 {
                    let ack = pb::SchedulerMessage {
                        body: Some(Command::Ack(pb::Ack { up_to_seq: seq })),
                    };
                    if tx.send(ack).is_err() {
                        break;
                    }
                }
            }
            scheduler.detach_node(&node_id, connection).await;
        });
        let outbound = UnboundedReceiverStream::new(rx).map(Ok);
        Ok(Response::new(Box::pin(outbound)))
    }
}

// ---- decoding what agents say ------------------------------------------------------------

fn registration_from_pb(r: pb::Register) -> Registration {
    Registration {
        node_id: r.node_id,
        boot_id: r.boot_id,
        region: r.region,
        total_memory_mib: r.total_memory_mib,
        cpus: r.cpus,
        max_concurrent_runs: r.max_concurrent_runs,
        active_run_ids: r.active_run_ids,
        agent_version: r.agent_version,
        cached_images: r.cached_images,
    }
}

/// A report, or `None` for a message that is no report (a second `Register`).
fn report_from_pb(body: Body) -> Option<AgentReport> {
    Some(match body {
        Body::Register(_) => return None,
        Body::Heartbeat(h) => AgentReport::Heartbeat(Heartbeat {
            free_memory_mib: h.free_memory_mib,
            running_run_ids: h.running_run_ids,
            cached_images: h.cached_images,
        }),
        Body::RunStarted(s) => AgentReport::RunStarted(RunStarted {
            run_id: s.run_id,
            lease_epoch: s.lease_epoch,
            started_at_unix_nanos: s.started_at_unix_nanos,
            image_digest: (!s.image_digest.is_empty()).then_some(s.image_digest),
        }),
        Body::RunExited(e) => AgentReport::RunExited(RunExited {
            reason: exit_reason_from_pb(e.reason),
            run_id: e.run_id,
            lease_epoch: e.lease_epoch,
            exit_code: e.exit_code,
            exited_at_unix_nanos: e.exited_at_unix_nanos,
            error_code: e.error_code,
            error_message: e.error_message,
            oom_killed: e.oom_killed,
        }),
        Body::LogBatch(b) => AgentReport::Logs(LogBatch {
            run_id: b.run_id,
            lines: b
                .lines
                .into_iter()
                .map(|l| LogLine {
                    seq: l.seq,
                    stream: log_stream_from_pb(l.stream),
                    msg: l.msg,
                    ts_unix_nanos: l.ts_unix_nanos,
                })
                .collect(),
        }),
        Body::WarmupResult(w) => AgentReport::WarmupResult(WarmupResult {
            runner_id: w.runner_id,
            image: w.image,
            outcome: if w.ok {
                Ok(w.image_digest)
            } else {
                Err(w.error_message)
            },
        }),
        Body::PullProgress(p) => AgentReport::PullProgress(PullProgress {
            // A pull with no run is a warmup's.
            pull_for: if p.run_id.is_empty() {
                PullFor::Warmup {
                    runner_id: p.runner_id,
                }
            } else {
                PullFor::Run {
                    run_id: p.run_id,
                    lease_epoch: p.lease_epoch,
                }
            },
            image: p.image,
            progress: ImagePull {
                bytes_done: p.bytes_done,
                bytes_total: p.bytes_total,
                layers_done: p.layers_done,
                layers_total: p.layers_total,
            },
            complete: p.complete,
        }),
    })
}

/// An unknown reason (a newer agent's) counts as unspecified: a failure.
fn exit_reason_from_pb(reason: i32) -> ExitReason {
    match pb::ExitReason::try_from(reason) {
        Ok(pb::ExitReason::Exited) => ExitReason::Exited,
        Ok(pb::ExitReason::Timeout) => ExitReason::Timeout,
        Ok(pb::ExitReason::Stopped) => ExitReason::Stopped,
        Ok(pb::ExitReason::StartFailed) => ExitReason::StartFailed,
        Ok(pb::ExitReason::Unspecified) | Err(_) => ExitReason::Unspecified,
    }
}

/// Anything but stderr (unspecified included) is stdout.
fn log_stream_from_pb(stream: i32) -> LogStream {
    match pb::LogStream::try_from(stream) {
        Ok(pb::LogStream::Stderr) => LogStream::Stderr,
        _ => LogStream::Stdout,
    }
}

// ---- encoding what the scheduler commands ------------------------------------------------

fn command_to_pb(command: AgentCommand) -> pb::SchedulerMessage {
    let body = match command {
        AgentCommand::Registered(Registered {
            heartbeat_interval_seconds,
            stale_run_ids,
        }) => Command::Registered(pb::Registered {
            heartbeat_interval_seconds,
            stale_run_ids,
        }),
        AgentCommand::AssignRun(AssignRun {
            run_id,
            lease_epoch,
            spec,
        }) => Command::AssignRun(pb::AssignRun {
            run_id,
            lease_epoch,
            spec: Some(run_spec_to_pb(spec)),
        }),
        AgentCommand::StopRun { run_id } => Command::StopRun(pb::StopRun { run_id }),
        AgentCommand::Warmup(Warmup {
            runner_id,
            image,
            registry_auth,
        }) => Command::Warmup(pb::Warmup {
            runner_id,
            image,
            registry_auth: registry_auth.map(registry_auth_to_pb),
        }),
        AgentCommand::WarmPins { images } => Command::WarmPins(pb::WarmPins { images }),
    };
    pb::SchedulerMessage { body: Some(body) }
}

fn run_spec_to_pb(spec: RunSpec) -> pb::RunSpec {
    pb::RunSpec {
        image: spec.image,
        entrypoint_set: spec.entrypoint.is_some(),
        entrypoint: spec.entrypoint.unwrap_or_default(),
        cmd_set: spec.cmd.is_some(),
        cmd: spec.cmd.unwrap_or_default(),
        env: spec.env,
        timeout_seconds: spec.timeout_seconds,
        memory_mib: spec.memory_mib,
        cpu_millis: spec.cpu_millis,
        stop_grace_seconds: spec.stop_grace_seconds,
        registry_auth: spec.registry_auth.map(registry_auth_to_pb),
        // The one copy of each file's content: the domain spec shares the run's.
        files: spec
            .files
            .into_iter()
            .map(|f| pb::RunFile {
                path: f.path,
                content: f.content.to_vec(),
                mode: f.mode,
            })
            .collect(),
    }
}

fn registry_auth_to_pb(auth: RegistryAuth) -> pb::RegistryAuth {
    pb::RegistryAuth {
        host: auth.host,
        username: auth.username,
        password: auth.password,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_core::model::RunFile;
    use std::collections::HashMap;

    #[test]
    fn reports_decode_as_before() {
        let warmup_pull = Body::PullProgress(pb::PullProgress {
            runner_id: "runner-1".into(),
            image: "img".into(),
            bytes_done: 4,
            ..Default::default()
        });
        match report_from_pb(warmup_pull) {
            Some(AgentReport::PullProgress(p)) => {
                assert_eq!(
                    p.pull_for,
                    PullFor::Warmup {
                        runner_id: "runner-1".into()
                    },
                    "a pull with no run is a warmup's"
                );
                assert_eq!(p.progress.bytes_done, 4);
            }
            other => panic!("expected pull progress, got {other:?}"),
        }
        let started = Body::RunStarted(pb::RunStarted {
            run_id: "r".into(),
            ..Default::default()
        });
        match report_from_pb(started) {
            Some(AgentReport::RunStarted(s)) => assert_eq!(s.image_digest, None),
            other => panic!("expected a start, got {other:?}"),
        }
        for (reason, want) in [
            (pb::ExitReason::Exited as i32, ExitReason::Exited),
            (pb::ExitReason::Timeout as i32, ExitReason::Timeout),
            (pb::ExitReason::Stopped as i32, ExitReason::Stopped),
            (pb::ExitReason::StartFailed as i32, ExitReason::StartFailed),
            (pb::ExitReason::Unspecified as i32, ExitReason::Unspecified),
            (99, ExitReason::Unspecified),
        ] {
            assert_eq!(exit_reason_from_pb(reason), want, "{reason}");
        }
        assert_eq!(
            log_stream_from_pb(pb::LogStream::Stderr as i32),
            LogStream::Stderr
        );
        assert_eq!(
            log_stream_from_pb(pb::LogStream::Unspecified as i32),
            LogStream::Stdout
        );
        let failed = Body::WarmupResult(pb::WarmupResult {
            ok: false,
            error_message: "404".into(),
            image_digest: "sha256:ignored".into(),
            ..Default::default()
        });
        match report_from_pb(failed) {
            Some(AgentReport::WarmupResult(w)) => assert_eq!(w.outcome, Err("404".into())),
            other => panic!("expected a warmup result, got {other:?}"),
        }
        let again = Body::Register(pb::Register::default());
        assert_eq!(
            report_from_pb(again),
            None,
            "a second Register is no report"
        );
    }

    #[test]
    fn a_run_spec_encodes_unset_and_empty_overrides_apart() {
        let spec = RunSpec {
            image: "img".into(),
            entrypoint: Some(vec![]),
            cmd: None,
            env: HashMap::from([("A".to_owned(), "1".to_owned())]),
            timeout_seconds: 5,
            memory_mib: 256,
            cpu_millis: 500,
            stop_grace_seconds: 3,
            registry_auth: Some(RegistryAuth {
                host: "h".into(),
                username: "u".into(),
                password: "p".into(),
            }),
            files: vec![RunFile::new("/etc/x".into(), 0o444, b"hi".to_vec())],
        };
        let command = AgentCommand::AssignRun(AssignRun {
            run_id: "r".into(),
            lease_epoch: 7,
            spec,
        });
        let Some(Command::AssignRun(a)) = command_to_pb(command).body else {
            panic!("expected AssignRun");
        };
        assert_eq!((a.run_id.as_str(), a.lease_epoch), ("r", 7));
        let spec = a.spec.unwrap_or_default();
        assert!(spec.entrypoint_set && spec.entrypoint.is_empty(), "cleared");
        assert!(!spec.cmd_set, "the image's command stays");
        assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(spec.registry_auth.map(|r| r.password), Some("p".to_owned()));
        assert_eq!(
            spec.files,
            [pb::RunFile {
                path: "/etc/x".into(),
                content: b"hi".to_vec(),
                mode: 0o444,
            }]
        );
    }
}
