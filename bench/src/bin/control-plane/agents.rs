//! Fake agents over real gRPC `AgentService.Attach`: each registers, heartbeats and answers
//! every assignment at once; [`Observed`] is what they saw, with their own timestamps.

use anyhow::{bail, Context};
use berth_proto::v1 as pb;
use berth_proto::v1::agent_message::Body as Up;
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_proto::v1::scheduler_message::Body as Down;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

/// What the fake agents observed, shared with the main task.
#[derive(Default)]
pub(crate) struct Observed {
    /// When each run's first `AssignRun` arrived, where, under which lease epoch.
    pub(crate) assigned: Mutex<HashMap<String, Assignment>>,
    /// A second `AssignRun` for a run already assigned: (run id, first, second).
    pub(crate) duplicate_assignments: Mutex<Vec<(String, Assignment, Assignment)>>,
    /// When the scheduler acknowledged each run's `RunExited`.
    pub(crate) completed: Mutex<HashMap<String, Instant>>,
    /// `CreateRun` calls answered.
    pub(crate) answered_count: AtomicUsize,
    /// Distinct runs assigned and completed.
    pub(crate) assigned_count: AtomicUsize,
    pub(crate) completed_count: AtomicUsize,
    pub(crate) registered_count: AtomicUsize,
    /// The first agent failure, if any.
    failure: Mutex<Option<String>>,
}

#[derive(Debug, Clone)]
pub(crate) struct Assignment {
    pub(crate) at: Instant,
    pub(crate) node_id: String,
    pub(crate) lease_epoch: u64,
}

impl Observed {
    pub(crate) fn assigned(&self, run_id: &str, new: Assignment) {
        let Ok(mut m) = self.assigned.lock() else {
            return;
        };
        match m.get(run_id) {
            Some(first) => {
                if let Ok(mut d) = self.duplicate_assignments.lock() {
                    d.push((run_id.to_owned(), first.clone(), new));
                }
            }
            None => {
                m.insert(run_id.to_owned(), new);
                self.assigned_count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn completed(&self, run_id: String, at: Instant) {
        let Ok(mut m) = self.completed.lock() else {
            return;
        };
        if m.insert(run_id, at).is_none() {
            self.completed_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn fail(&self, why: String) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(why);
        }
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}

pub(crate) struct AgentIdentity {
    pub(crate) node_id: String,
    pub(crate) boot_id: String,
    pub(crate) region: &'static str,
    pub(crate) memory_mib: u64,
    pub(crate) slots: u32,
}

/// A fake agent: registers, heartbeats, and answers every assignment at once with
/// `RunStarted` and `RunExited` (exit 0), numbering its reports with an increasing outbox `seq`.
/// It does not reconnect: a broken stream fails the benchmark.
pub(crate) async fn fake_agent(
    me: AgentIdentity,
    channel: Channel,
    observed: Arc<Observed>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (up, up_rx) = mpsc::unbounded_channel();
    let send = |msg: pb::AgentMessage| {
        up.send(msg)
            .map_err(|_| anyhow::anyhow!("the outbound stream is closed"))
    };
    send(pb::AgentMessage {
        seq: 0,
        body: Some(Up::Register(pb::Register {
            node_id: me.node_id.clone(),
            boot_id: me.boot_id.clone(),
            region: me.region.to_owned(),
            total_memory_mib: me.memory_mib,
            cpus: 16,
            max_concurrent_runs: me.slots,
            active_run_ids: vec![],
            agent_version: "berth-bench fake agent".to_owned(),
            // Fields added to the proto later keep their defaults.
            ..Default::default()
        })),
    })?;
    let mut client = AgentServiceClient::new(channel);
    let mut down = client
        .attach(UnboundedReceiverStream::new(up_rx))
        .await
        .context("attach")?
        .into_inner();
    let mut seq = 0u64;
    // Outbox entries not yet acknowledged: (seq of the RunExited, run id).
    let mut unacked_exits: VecDeque<(u64, String)> = VecDeque::new();
    let mut heartbeat: Option<tokio::time::Interval> = None;
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = tick(&mut heartbeat) => send(pb::AgentMessage {
                seq: 0,
                body: Some(Up::Heartbeat(pb::Heartbeat {
                    free_memory_mib: me.memory_mib,
                    running_run_ids: vec![],
                    ..Default::default()
                })),
            })?,
            msg = down.message() => {
                let Some(msg) = msg.context("scheduler stream")? else {
                    bail!("the scheduler closed the stream of {}", me.node_id);
                };
                match msg.body {
                    Some(Down::Registered(r)) => {
                        let every = Duration::from_secs(u64::from(r.heartbeat_interval_seconds.max(1)));
                        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        heartbeat = Some(i);
                        observed.registered_count.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Down::AssignRun(a)) => {
                        let now = Instant::now();
                        observed.assigned(&a.run_id, Assignment {
                            at: now,
                            node_id: me.node_id.clone(),
                            lease_epoch: a.lease_epoch,
                        });
                        let nanos = unix_nanos();
                        seq += 1;
                        send(pb::AgentMessage {
                            seq,
                            body: Some(Up::RunStarted(pb::RunStarted {
                                run_id: a.run_id.clone(),
                                lease_epoch: a.lease_epoch,
                                started_at_unix_nanos: nanos,
                                image_digest: "sha256:0000000000000000000000000000000000000000000000000000000000000000".to_owned(),
                                stages: None,
                                runtime: String::new(),
                            })),
                        })?;
                        seq += 1;
                        send(pb::AgentMessage {
                            seq,
                            body: Some(Up::RunExited(pb::RunExited {
                                run_id: a.run_id.clone(),
                                lease_epoch: a.lease_epoch,
                                exit_code: 0,
                                exited_at_unix_nanos: nanos,
                                reason: pb::ExitReason::Exited.into(),
                                error_code: pb::ErrorCode::Unspecified.into(),
                                error_message: String::new(),
                                oom_killed: false,
                                reported_at_unix_nanos: nanos,
                                // Nothing to clean up: one report frees the capacity.
                                cleanup_pending: false,
                            })),
                        })?;
                        unacked_exits.push_back((seq, a.run_id));
                    }
                    Some(Down::Ack(ack)) => {
                        let now = Instant::now();
                        while unacked_exits.front().is_some_and(|(s, _)| *s <= ack.up_to_seq) {
                            let Some((_, run_id)) = unacked_exits.pop_front() else { break };
                            observed.completed(run_id, now);
                        }
                    }
                    // Nothing to stop or warm: the fake agent runs nothing.
                    Some(Down::StopRun(_)) | Some(Down::Warmup(_)) | Some(Down::WarmPins(_)) | None => {}
                }
            }
        }
    }
}

pub(crate) async fn tick(heartbeat: &mut Option<tokio::time::Interval>) {
    match heartbeat {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

pub(crate) fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
