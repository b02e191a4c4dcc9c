//! `AgentService`: one bidirectional stream per connected agent, and the one place where the
//! agent protocol's gRPC forms meet the engine's domain types ([`berth_core::agent`]): each
//! incoming message is decoded once, moving its fields, into a [`Registration`] or an
//! [`AgentReport`]; each [`AgentCommand`] the engine sends is encoded once, on its way out,
//! by [`GrpcLink`]. Sequence numbers and their acks are this stream's business only.

use crate::engine::{Link, RunReport, Scheduler};
use crate::error::SchedulerError;
use berth_core::agent::{
    AgentCommand, AgentLink, AgentReport, AssignRun, EphemeralClaim, Heartbeat, LinkClosed,
    LogBatch, LogLine, PullFor, PullProgress, Registered, Registration, RegistryAuth, RunExited,
    RunReleased, RunSpec, RunStarted, StartStages, Warmup, WarmupResult,
};
use berth_core::convert::{
    error_code_from_pb, exit_reason_from_pb, log_stream_from_pb, UnknownEnumValue,
};
use berth_core::model::ImagePull;
use berth_core::store::Store;
use berth_proto::v1 as pb;
use berth_proto::v1::agent_message::Body;
use berth_proto::v1::scheduler_message::Body as Command;
use futures::{Stream, StreamExt as _};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Log batches of one agent staged and not yet durable, at most (see `attach`).
const MAX_LOG_COMMITS_IN_FLIGHT: usize = 32;
/// Reports about runs (starts, exits, releases) of one agent handled as one operation, at most.
const MAX_RUN_REPORT_BATCH: usize = 128;

/// What an agent message says, decoded (`None`: nothing the engine handles).
type Decoded = Result<Option<AgentReport>, UnknownEnumValue>;

fn decode(msg: pb::AgentMessage) -> (u64, Decoded) {
    (
        msg.seq,
        msg.body
            .map(report_from_pb)
            .transpose()
            .map(Option::flatten),
    )
}

/// The run report `first` (message `seq`) with the reports about runs queued right behind it,
/// up to [`MAX_RUN_REPORT_BATCH`], to be handled as one operation; and the first message of
/// another kind taken from the queue, if any, to be handled next.
#[allow(clippy::type_complexity)]
fn gather_run_reports(
    seq: u64,
    first: RunReport,
    queued: &mut mpsc::UnboundedReceiver<pb::AgentMessage>,
) -> ((Vec<u64>, Vec<RunReport>), Option<(u64, Decoded)>) {
    let (mut seqs, mut reports) = (vec![seq], vec![first]);
    while reports.len() < MAX_RUN_REPORT_BATCH {
        let Ok(msg) = queued.try_recv() else { break };
        let next = match decode(msg) {
            (seq, Ok(Some(report))) => match RunReport::from_report(report) {
                Ok(report) => {
                    seqs.push(seq);
                    reports.push(report);
                    continue;
                }
                Err(other) => (seq, Ok(Some(other))),
            },
            other => other,
        };
        return ((seqs, reports), Some(next));
    }
    ((seqs, reports), None)
}

pub struct AgentApi<S> {
    pub scheduler: Arc<Scheduler<S>>,
    /// Every session must present a node credential (`x-berth-node-credential`). Without it
    /// (a scheduler with no cluster token, on loopback) a credential is still checked when
    /// presented, and an agent without one is taken at its word.
    pub require_credentials: bool,
}

type Outbound = Pin<Box<dyn Stream<Item = Result<pb::SchedulerMessage, Status>> + Send>>;

/// The engine's way to one agent: the sending half of its stream. A command is encoded when it
/// is sent (after its operation is durable), outside the engine's lock.
#[derive(Clone)]
pub struct GrpcLink {
    tx: mpsc::UnboundedSender<Result<pb::SchedulerMessage, Status>>,
}

impl AgentLink for GrpcLink {
    fn send(&self, command: AgentCommand) -> Result<(), LinkClosed> {
        self.tx
            .send(Ok(command_to_pb(command)))
            .map_err(|_| LinkClosed)
    }

    fn close(&self, reason: &str) {
        // An error item ends the response stream: the agent sees this status.
        let _ = self
            .tx
            .send(Err(Status::unauthenticated(reason.to_owned())));
    }
}

/// The node credential a call presents (`x-berth-node-credential`), if any.
fn presented_credential(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(berth_core::auth::NODE_CREDENTIAL_METADATA)
        .map(|v| v.to_str().unwrap_or_default().to_owned())
}

impl<S: Store> AgentApi<S> {
    /// Which node the session's credential speaks for, if it presents one (checked); refuses a
    /// session without one when credentials are required.
    async fn credential_node(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Option<berth_core::auth::NodeCredential>, Status> {
        match presented_credential(metadata) {
            Some(p) => Ok(Some(self.scheduler.authenticate_node(&p).await?)),
            None if self.require_credentials => Err(Status::unauthenticated(
                "this scheduler requires a node credential (x-berth-node-credential): start the \
                 agent with a registration token (--registration-token-file) to enroll",
            )),
            None => Ok(None),
        }
    }
}

/// A session's `Register` must name the node and region its credential was issued for.
fn check_identity(
    credential: &berth_core::auth::NodeCredential,
    register: &Registration,
) -> Result<(), Status> {
    if register.node_id != credential.node_id {
        return Err(Status::permission_denied(format!(
            "this credential belongs to node {}; it cannot register as {}",
            credential.node_id, register.node_id
        )));
    }
    if register.region != credential.region {
        return Err(Status::permission_denied(format!(
            "node {} was enrolled in region {}; it cannot register in {}",
            credential.node_id, credential.region, register.region
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl<S: Store> pb::agent_service_server::AgentService for AgentApi<S> {
    type AttachStream = Outbound;

    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let r = request.into_inner();
        let (credential, plaintext) = self
            .scheduler
            .enroll_node(&r.registration_token, &r.node_id, &r.region)
            .await?;
        Ok(Response::new(pb::EnrollResponse {
            node_credential: plaintext,
            credential_id: credential.credential_id,
        }))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let presented = presented_credential(request.metadata());
        let r = request.into_inner();
        crate::engine::validate_node_id("node_id", &r.node_id).map_err(SchedulerError::from)?;
        match presented {
            Some(p) => {
                self.scheduler
                    .authenticate_leaving_node(&p, &r.node_id)
                    .await?
            }
            None if self.require_credentials => {
                return Err(Status::unauthenticated(
                    "this scheduler requires the node's credential (x-berth-node-credential) \
                     for it to leave",
                ))
            }
            None => {}
        }
        let outcome = self.scheduler.leave_node(&r.node_id, r.remove).await?;
        Ok(Response::new(pb::LeaveResponse {
            active_runs: outcome.active_runs,
            removed: outcome.removed,
        }))
    }

    async fn attach(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        // Taken before the credential is checked: a revocation stored after the check still
        // keeps this session from registering the node (see `RevocationMark`).
        let mark = self.scheduler.revocation_mark();
        let credential = self.credential_node(request.metadata()).await?;
        let mut inbound = request.into_inner();
        let register = match inbound.message().await?.and_then(|m| m.body) {
            Some(Body::Register(r)) => registration_from_pb(r),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be Register",
                ))
            }
        };
        if let Some(credential) = &credential {
            check_identity(credential, &register)?;
        }
        let node_id = register.node_id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let link: Link = Arc::new(GrpcLink { tx: tx.clone() });
        let connection = match credential {
            Some(_) => {
                self.scheduler
                    .attach_node_checked(register, link, mark)
                    .await?
            }
            None => self.scheduler.attach_node(register, link).await?,
        };
        // The reader records liveness the moment a message arrives, whatever it is and however
        // long the engine takes with the messages before it; the processor handles them in
        // order. A busy scheduler therefore never mistakes a healthy node for a lost one.
        let (queue, mut queued) = mpsc::unbounded_channel::<pb::AgentMessage>();
        let reader_scheduler = self.scheduler.clone();
        let reader_node = node_id.clone();
        let reader_tx = tx.clone();
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
                        // E.g. a message above the size limit: tell the agent why before the
                        // stream ends, so its log says more than "stream closed".
                        tracing::warn!(node_id = %reader_node, error = %e, "agent stream failed");
                        let refused = Status::new(
                            e.code(),
                            format!("the scheduler could not read a message: {}", e.message()),
                        );
                        reader_scheduler.record_delivery_error(
                            &reader_node,
                            refused.message(),
                            std::time::Instant::now(),
                        );
                        let _ = reader_tx.send(Err(refused));
                        break;
                    }
                }
            }
        });
        let scheduler = self.scheduler.clone();
        tokio::spawn(async move {
            let scheduler = &scheduler;
            let node = node_id.as_str();
            // Log batches are staged in order and their commits awaited in order, while the
            // next ones are staged: the store's group commit then makes several durable with
            // one fsync. Any other report waits until every batch before it is durable, so a
            // run's end is never handled while a line of it could still fail to be stored.
            let mut committing = futures::stream::FuturesOrdered::new();
            // Not acknowledged: end the stream, telling the agent why, so it reconnects and
            // sends again what was not acknowledged (UNAVAILABLE: a code the agent retries,
            // whatever the cause; a one-shot node gives up on the codes that refuse it).
            let failed = |seq: u64, e: SchedulerError| {
                tracing::error!(node_id = %node, seq, error = %e, "could not handle agent message");
                let why = format!("could not handle message {seq}: {e}");
                scheduler.record_delivery_error(node, &why, std::time::Instant::now());
                let _ = tx.send(Err(Status::unavailable(why)));
            };
            let ack = |seq: u64| {
                if seq == 0 {
                    return true;
                }
                scheduler.clear_delivery_error(node);
                tx.send(Ok(pb::SchedulerMessage {
                    body: Some(Command::Ack(pb::Ack { up_to_seq: seq })),
                }))
                .is_ok()
            };
            // A batch's commit ended: acknowledged if durable; false: the session ends.
            let settle = |(seq, done): (u64, Result<(), SchedulerError>)| match done {
                Ok(()) => ack(seq),
                Err(e) => {
                    failed(seq, e);
                    false
                }
            };
            // A message taken from the queue while gathering a batch that is not part of it:
            // the next one handled.
            let mut held: Option<(u64, Decoded)> = None;
            'session: loop {
                let (seq, decoded) = match held.take() {
                    Some(next) => next,
                    None => {
                        let msg = tokio::select! {
                            biased;
                            Some(done) = committing.next(), if !committing.is_empty() => {
                                if settle(done) {
                                    continue;
                                }
                                break;
                            }
                            msg = queued.recv(), if committing.len() < MAX_LOG_COMMITS_IN_FLIGHT => msg,
                        };
                        let Some(msg) = msg else { break };
                        decode(msg)
                    }
                };
                let report = match decoded {
                    Ok(Some(report)) => Some(report),
                    Ok(None) => {
                        tracing::warn!(node_id = %node, "unexpected message on an attached stream");
                        None
                    }
                    Err(e) => {
                        // A message this scheduler cannot read: the agent hears why, and the
                        // message stays unacknowledged.
                        let e = SchedulerError::from(e);
                        tracing::error!(node_id = %node, seq, error = %e, "unreadable agent message");
                        scheduler.record_delivery_error(
                            node,
                            &format!("unreadable message {seq}: {e}"),
                            std::time::Instant::now(),
                        );
                        let _ = tx.send(Err(e.into()));
                        break;
                    }
                };
                if let Some(AgentReport::Logs(batch)) = report {
                    match scheduler.stage_logs(node, batch).await {
                        Ok(commit) => committing.push_back(async move { (seq, commit.await) }),
                        Err(e) => {
                            failed(seq, e);
                            break;
                        }
                    }
                    continue;
                }
                // Every batch ahead of this message is durable (and acknowledged: acks are
                // cumulative) before it is handled.
                while let Some(done) = committing.next().await {
                    if !settle(done) {
                        break 'session;
                    }
                }
                let report = match report.map(RunReport::from_report) {
                    Some(Ok(first)) => {
                        let (seqs, reports);
                        ((seqs, reports), held) = gather_run_reports(seq, first, &mut queued);
                        match scheduler.run_reports(node, reports).await {
                            Ok(()) => {
                                if !ack(seqs.last().copied().unwrap_or(seq)) {
                                    break;
                                }
                            }
                            Err(e) => {
                                failed(seq, e);
                                break;
                            }
                        }
                        continue;
                    }
                    Some(Err(other)) => Some(other),
                    None => None,
                };
                if let Some(report) = report {
                    if let Err(e) = scheduler.report(node, report).await {
                        failed(seq, e);
                        break;
                    }
                }
                if !ack(seq) {
                    break;
                }
            }
            drop(committing);
            scheduler.detach_node(&node_id, connection).await;
        });
        let outbound = UnboundedReceiverStream::new(rx);
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
        ephemeral: (!r.ephemeral_run_id.is_empty()).then_some(EphemeralClaim {
            run_id: r.ephemeral_run_id,
            claim: r.ephemeral_claim,
        }),
        runtimes: r.runtimes,
    }
}

fn stages_from_pb(s: pb::StartStages) -> StartStages {
    StartStages {
        received_at_unix_nanos: s.received_at_unix_nanos,
        image_ready_at_unix_nanos: s.image_ready_at_unix_nanos,
        prepared_at_unix_nanos: s.prepared_at_unix_nanos,
        network_ready_at_unix_nanos: s.network_ready_at_unix_nanos,
        task_created_at_unix_nanos: s.task_created_at_unix_nanos,
        sandbox: s.sandbox,
    }
}

/// A report, or `None` for a message that is no report (a second `Register`); an error when a
/// required field holds no value this scheduler knows.
fn report_from_pb(body: Body) -> Result<Option<AgentReport>, UnknownEnumValue> {
    Ok(Some(match body {
        Body::Register(_) => return Ok(None),
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
            stages: s.stages.map(stages_from_pb).unwrap_or_default(),
            runtime: (!s.runtime.is_empty()).then_some(s.runtime),
        }),
        Body::RunReleased(r) => AgentReport::RunReleased(RunReleased {
            run_id: r.run_id,
            lease_epoch: r.lease_epoch,
        }),
        Body::RunExited(e) => AgentReport::RunExited(RunExited {
            reason: exit_reason_from_pb(e.reason),
            run_id: e.run_id,
            lease_epoch: e.lease_epoch,
            exit_code: e.exit_code,
            exited_at_unix_nanos: e.exited_at_unix_nanos,
            error_code: error_code_from_pb(e.error_code),
            error_message: e.error_message,
            oom_killed: e.oom_killed,
            reported_at_unix_nanos: e.reported_at_unix_nanos,
            cleanup_pending: e.cleanup_pending,
        }),
        Body::LogBatch(b) => AgentReport::Logs(LogBatch {
            run_id: b.run_id,
            lines: b
                .lines
                .into_iter()
                .map(|l| {
                    Ok(LogLine {
                        seq: l.seq,
                        stream: log_stream_from_pb(l.stream)?,
                        msg: l.msg,
                        ts_unix_nanos: l.ts_unix_nanos,
                    })
                })
                .collect::<Result<_, UnknownEnumValue>>()?,
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
    }))
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
            runner_id,
            trace_parent,
        }) => Command::AssignRun(pb::AssignRun {
            run_id,
            lease_epoch,
            spec: Some(run_spec_to_pb(spec)),
            runner_id,
            traceparent: trace_parent.unwrap_or_default(),
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
        AgentCommand::WarmPins { images, sandboxes } => Command::WarmPins(pb::WarmPins {
            images,
            sandboxes: sandboxes
                .into_iter()
                .map(|s| pb::WarmSandboxes {
                    runner_id: s.runner_id,
                    count: s.count,
                    spec: Some(run_spec_to_pb(s.spec)),
                })
                .collect(),
        }),
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
        isolation: berth_core::convert::isolation_to_pb(spec.isolation).into(),
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
    use berth_core::agent::ExitReason;
    use berth_core::codes::ErrorCode;
    use berth_core::model::{LogStream, RunFile};
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
            Ok(Some(AgentReport::PullProgress(p))) => {
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
            Ok(Some(AgentReport::RunStarted(s))) => assert_eq!(s.image_digest, None),
            other => panic!("expected a start, got {other:?}"),
        }
        let failed = Body::WarmupResult(pb::WarmupResult {
            ok: false,
            error_message: "404".into(),
            image_digest: "sha256:ignored".into(),
            ..Default::default()
        });
        match report_from_pb(failed) {
            Ok(Some(AgentReport::WarmupResult(w))) => assert_eq!(w.outcome, Err("404".into())),
            other => panic!("expected a warmup result, got {other:?}"),
        }
        let again = Body::Register(pb::Register::default());
        assert_eq!(
            report_from_pb(again),
            Ok(None),
            "a second Register is no report"
        );
    }

    #[test]
    fn exits_carry_their_reason_and_code_as_enums() {
        let exit = |reason: pb::ExitReason, code: pb::ErrorCode| {
            Body::RunExited(pb::RunExited {
                run_id: "r".into(),
                reason: reason.into(),
                error_code: code.into(),
                ..Default::default()
            })
        };
        let decoded = |body| match report_from_pb(body) {
            Ok(Some(AgentReport::RunExited(e))) => (e.reason, e.error_code),
            other => panic!("expected an exit, got {other:?}"),
        };
        assert_eq!(
            decoded(exit(
                pb::ExitReason::StartFailed,
                pb::ErrorCode::NodeDraining
            )),
            (ExitReason::StartFailed, Some(ErrorCode::NodeDraining))
        );
        assert_eq!(
            decoded(exit(pb::ExitReason::Exited, pb::ErrorCode::Unspecified)),
            (ExitReason::Exited, None),
            "no code"
        );
        let newer = Body::RunExited(pb::RunExited {
            reason: 99,
            error_code: 99,
            ..Default::default()
        });
        assert_eq!(
            decoded(newer),
            (ExitReason::Unspecified, None),
            "a newer agent's reason and code"
        );
    }

    #[test]
    fn a_log_line_without_a_stream_is_refused() {
        let line = |stream: i32| pb::LogLine {
            seq: 1,
            stream,
            msg: "m".into(),
            ts_unix_nanos: 5,
        };
        let batch = |lines| {
            Body::LogBatch(pb::LogBatch {
                run_id: "r".into(),
                lines,
            })
        };
        match report_from_pb(batch(vec![line(pb::LogStream::Stderr.into())])) {
            Ok(Some(AgentReport::Logs(b))) => {
                assert_eq!(b.lines[0].stream, LogStream::Stderr);
            }
            other => panic!("expected logs, got {other:?}"),
        }
        let unspecified = batch(vec![
            line(pb::LogStream::Stdout.into()),
            line(pb::LogStream::Unspecified.into()),
        ]);
        let err = report_from_pb(unspecified).err();
        assert_eq!(err.map(|e| e.value), Some(0));
        let status = tonic::Status::from(SchedulerError::from(
            report_from_pb(batch(vec![line(7)])).expect_err("unknown stream"),
        ));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("stream"), "{status:?}");
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
            isolation: berth_core::Isolation::Sandbox,
        };
        let command = AgentCommand::AssignRun(AssignRun {
            run_id: "r".into(),
            lease_epoch: 7,
            spec,
            runner_id: "rn".into(),
            trace_parent: None,
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
        assert_eq!(spec.isolation, pb::Isolation::Sandbox as i32);
    }
}
