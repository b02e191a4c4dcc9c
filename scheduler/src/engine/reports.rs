//! What agents report after registering ([`AgentReport`]): heartbeats, run starts and exits,
//! log lines (stored by `logs`, with secret values redacted), warmup results and pull progress. Every report
//! about a run is checked against the run's current lease first: a stale one is ignored or
//! fenced with a stop.

use super::{committed, stop, Scheduler, State};
use crate::error::SchedulerError;
use berth_core::agent::{
    AgentReport, ExitReason, Heartbeat, RunExited, RunReleased, RunStarted, WarmupResult,
};
use berth_core::codes::ErrorCode;
use berth_core::model::WarmupStatus;
use berth_core::status::TIMEOUT_EXIT_CODE;
use berth_core::store::Store;
use berth_core::{now_unix_millis, RunStatus, TransitionError};
use std::sync::Arc;
use std::time::Instant;

impl<S: Store> Scheduler<S> {
    /// Handles one report from `node_id`'s agent. An error means it was not handled (nor
    /// stored): the agent must send it again.
    pub async fn report(&self, node_id: &str, report: AgentReport) -> Result<(), SchedulerError> {
        match report {
            AgentReport::Heartbeat(hb) => {
                self.heartbeat(node_id, hb).await;
                Ok(())
            }
            AgentReport::RunStarted(m) => self.run_started(node_id, m).await,
            AgentReport::RunReleased(m) => self.run_released(node_id, m).await,
            AgentReport::RunExited(m) => self.run_exited(node_id, m).await,
            AgentReport::Logs(batch) => self.append_logs(node_id, batch).await,
            AgentReport::WarmupResult(w) => self.warmup_result(node_id, w).await,
            AgentReport::PullProgress(p) => {
                self.pull_progress(node_id, p);
                Ok(())
            }
        }
    }

    /// Renews every lease the node holds. Runs it reports running that are no longer leased to
    /// it (its leases were revoked while it was silent, or the run ended) are fenced: StopRun,
    /// and their capacity stays held until a heartbeat no longer lists them (see `Node::stale`).
    pub async fn heartbeat(&self, node_id: &str, hb: Heartbeat) {
        let mut st = self.state.lock().await;
        let Some(node) = st.nodes.get_mut(node_id) else {
            return;
        };
        self.touch(node_id, Instant::now());
        // A node lost because it cannot deliver stays lost until it does (see `delivery`).
        let was_lost = node.lost && !node.undeliverable;
        if was_lost {
            node.lost = false;
            tracing::warn!(
                node_id,
                "lost node is heartbeating again; fencing its old runs"
            );
        }
        if node.cached_images.len() != hb.cached_images.len()
            || !hb
                .cached_images
                .iter()
                .all(|i| node.cached_images.contains(i))
        {
            node.cached_images = Arc::new(hb.cached_images.into_iter().collect());
        }
        st.sync_node(node_id);
        let (stale, released) = st.reconcile_stale(node_id, &hb.running_run_ids);
        for run_id in &stale {
            tracing::warn!(node_id, run_id = %run_id, "node runs a run it holds no lease for; stopping it");
            st.send_to(node_id, stop(run_id));
        }
        if was_lost || released {
            if let Err(e) = self.schedule(&mut st) {
                tracing::error!(error = %e, "scheduling after a node came back failed");
            }
        }
        let done = self.flush(&mut st);
        drop(st);
        if let Err(e) = committed(done).await {
            tracing::error!(node_id, error = %e, "heartbeat effects not stored");
        }
    }

    /// A node finished (or failed) pulling a runner's image.
    pub async fn warmup_result(
        &self,
        node_id: &str,
        msg: WarmupResult,
    ) -> Result<(), SchedulerError> {
        let written = self
            .change_runner(&msg.runner_id, |runner| {
                let Some(w) = runner
                    .warmup
                    .as_mut()
                    .filter(|w| w.node_id == node_id && w.image == msg.image)
                else {
                    return false; // a newer warmup replaced this one
                };
                match &msg.outcome {
                    Ok(_digest) => {
                        w.status = WarmupStatus::Ready;
                        w.error = None;
                        runner.warmed_at = Some(now_unix_millis());
                    }
                    Err(error) => {
                        w.status = WarmupStatus::Failed;
                        w.error = Some(format!("{}: {error}", ErrorCode::ImagePullFailed));
                    }
                }
                true
            })
            .await?;
        if written {
            tracing::info!(runner_id = %msg.runner_id, node_id, ok = msg.outcome.is_ok(), "warmup finished");
        }
        Ok(())
    }

    pub async fn run_started(&self, node_id: &str, msg: RunStarted) -> Result<(), SchedulerError> {
        let mut st = self.state.lock().await;
        let effect = self.apply_report(&mut st, node_id, RunReport::Started(msg));
        self.finish(st, effect).await
    }

    /// Applies one report about a run. A report the run's lifecycle refuses contradicts what
    /// the record says (an agent asking to re-queue a run it already reported started, say):
    /// sending it again cannot change that, and holding it would hold every report the node
    /// sends after it. It is dropped — logged with its run and node, and counted
    /// (`berth_agent_reports_refused_total`) — and counts as handled; the record stands.
    fn apply_report(&self, st: &mut State, node_id: &str, report: RunReport) -> Effect {
        let (run_id, kind) = match &report {
            RunReport::Started(m) => (m.run_id.clone(), "run_started"),
            RunReport::Exited(m) => (m.run_id.clone(), "run_exited"),
            RunReport::Released(m) => (m.run_id.clone(), "run_released"),
        };
        let applied = match report {
            RunReport::Started(m) => self.apply_started(st, node_id, m),
            RunReport::Exited(m) => self.apply_exited(st, node_id, m),
            RunReport::Released(m) => Ok(apply_released(st, node_id, &m)),
        };
        applied.unwrap_or_else(|refused| {
            tracing::warn!(node_id, run_id = %run_id, report = kind, error = %refused, "a report contradicts the run's record; dropped");
            crate::metrics::report_refused();
            Effect::Nothing
        })
    }

    fn apply_started(
        &self,
        st: &mut State,
        node_id: &str,
        msg: RunStarted,
    ) -> Result<Effect, TransitionError> {
        let current = st.leased(&msg.run_id, node_id, msg.lease_epoch);
        let Some(mut run) = current else {
            // Ended, canceled or re-placed meanwhile: fence the stale lease.
            tracing::warn!(run_id = %msg.run_id, node_id, lease_epoch = msg.lease_epoch, "stale start report; stopping it");
            st.send_to(node_id, stop(&msg.run_id));
            return Ok(Effect::Store);
        };
        if run.status != RunStatus::Pending {
            return Ok(Effect::Nothing); // a re-sent report
        }
        self.take_pull_for_start(&mut run);
        let at = nanos_to_millis(msg.started_at_unix_nanos);
        run.start(at, msg.image_digest)?;
        run.runtime = msg.runtime;
        run.timeline
            .record_start(&msg.stages, msg.started_at_unix_nanos);
        tracing::info!(run_id = %run.id, node_id, runtime = run.runtime.as_deref().unwrap_or(""), "run started");
        st.stage(run);
        Ok(Effect::Store)
    }

    pub async fn run_exited(&self, node_id: &str, msg: RunExited) -> Result<(), SchedulerError> {
        let mut st = self.state.lock().await;
        let effect = self.apply_report(&mut st, node_id, RunReport::Exited(msg));
        self.finish(st, effect).await
    }

    /// Only the run's lifecycle can refuse an exit: every change it stages comes after the
    /// transitions that could fail, so a refused one leaves the state as it was.
    fn apply_exited(
        &self,
        st: &mut State,
        node_id: &str,
        msg: RunExited,
    ) -> Result<Effect, TransitionError> {
        let current = st.leased(&msg.run_id, node_id, msg.lease_epoch);
        let Some(mut run) = current else {
            tracing::debug!(run_id = %msg.run_id, node_id, "exit report for a run that already ended");
            // An exit reported once the container is cleaned up: a stale run's capacity is
            // free again. One reported before cleanup (a re-sent report) frees nothing yet.
            if !msg.cleanup_pending && st.release_stale(node_id, &msg.run_id) {
                return Ok(Effect::StoreAndPlace);
            }
            return Ok(Effect::Nothing);
        };
        self.forget_pull(&run.id);
        let at = if msg.exited_at_unix_nanos > 0 {
            nanos_to_millis(msg.exited_at_unix_nanos)
        } else {
            now_unix_millis()
        };
        let reason = msg.reason;
        if reason == ExitReason::StartFailed
            && msg.error_code == Some(ErrorCode::NodeDraining)
            && !run.stop_requested
        {
            // The agent is shutting down and refused the run: place it elsewhere.
            run.requeue(&format!("node {node_id} is shutting down"))?;
            if let Some(node) = st.nodes.get_mut(node_id) {
                node.shutting_down = true;
            }
            st.sync_node(node_id);
            tracing::info!(run_id = %run.id, node_id, "re-queued: the node is shutting down");
            st.stage(run);
            return Ok(Effect::StoreAndPlace);
        }
        let code = (msg.exit_code >= 0).then_some(msg.exit_code);
        if run.status == RunStatus::Pending && reason != ExitReason::StartFailed {
            run.start(at, None)?;
        }
        match reason {
            ExitReason::StartFailed if run.stop_requested => run.cancel(None, at)?,
            ExitReason::StartFailed | ExitReason::Unspecified => run.fail(
                msg.error_code.unwrap_or(ErrorCode::StartFailed),
                &msg.error_message,
                at,
            )?,
            ExitReason::Stopped => run.cancel(code, at)?,
            ExitReason::Timeout => {
                run.exit(TIMEOUT_EXIT_CODE, at)?;
                run.error_code = Some(ErrorCode::Timeout);
                run.error_message = Some(format!(
                    "the run exceeded its timeout of {} seconds",
                    run.timeout_seconds
                ));
            }
            ExitReason::Exited => {
                run.exit(msg.exit_code, at)?;
                // The agent lost the task (e.g. containerd came back without it): say so.
                if let Some(code) = msg.error_code {
                    run.error_code = Some(code);
                    run.error_message = Some(msg.error_message.clone());
                }
            }
        }
        if msg.oom_killed {
            run.oom_killed = true;
            run.error_code = Some(ErrorCode::OomKilled);
            run.error_message = Some(format!(
                "the run exceeded its memory limit of {} MiB and was killed",
                run.memory_mib
            ));
        }
        run.timeline.exited = msg.exited_at_unix_nanos.max(0) / 1_000;
        run.timeline.exit_reported = msg.reported_at_unix_nanos.max(0) / 1_000;
        run.timeline.ended = berth_core::now_unix_micros();
        tracing::info!(run_id = %run.id, node_id, status = %run.status, exit_code = ?run.exit_code, cleanup_pending = msg.cleanup_pending, "run ended");
        let (run_id, memory_mib) = (run.id.clone(), run.memory_mib);
        let frees_slot = st.caps.capped(&run.runner_id);
        st.stage(run);
        if msg.cleanup_pending {
            // Reported before the container is gone: its capacity stays held until the node
            // says it is cleaned up (RunReleased). Its runner's slot is free now, though: a
            // capped runner's next run may fit elsewhere (or beside it).
            st.hold_while_cleaning(node_id, &run_id, memory_mib);
            return Ok(if frees_slot {
                Effect::StoreAndPlace
            } else {
                Effect::Store
            });
        }
        // The node itself reports the end: nothing of the run is left there.
        st.release_stale(node_id, &run_id);
        Ok(Effect::StoreAndPlace)
    }

    /// The node cleaned up a run whose exit it reported early: its capacity is free again.
    pub async fn run_released(
        &self,
        node_id: &str,
        msg: RunReleased,
    ) -> Result<(), SchedulerError> {
        let mut st = self.state.lock().await;
        let effect = apply_released(&mut st, node_id, &msg);
        self.finish(st, effect).await
    }

    /// Reports about runs that one node sent together (its agent's outbox drains in bursts
    /// when the scheduler is busy), handled in order under one lock: their writes are stored
    /// as one operation (a run started and ended in the batch is written once), and what they
    /// free is placed in one pass. A report the run's lifecycle refuses is dropped (see
    /// `apply_report`) and the rest of the batch goes on. Ok: every report is handled
    /// and what they changed is durable; an error: none of them counts as handled.
    pub async fn run_reports(
        &self,
        node_id: &str,
        reports: Vec<RunReport>,
    ) -> Result<(), SchedulerError> {
        let mut st = self.state.lock().await;
        let effect = reports
            .into_iter()
            .map(|report| self.apply_report(&mut st, node_id, report))
            .max()
            .unwrap_or(Effect::Nothing);
        self.finish(st, effect).await
    }

    /// Ends an operation that applied reports: stores what they staged (placing first if one
    /// freed capacity) and waits until it is durable.
    async fn finish(
        &self,
        st: tokio::sync::MutexGuard<'_, State>,
        effect: Effect,
    ) -> Result<(), SchedulerError> {
        match effect {
            Effect::Nothing => Ok(()),
            Effect::Store => self.settle(st, false).await,
            Effect::StoreAndPlace => self.settle(st, true).await,
        }
    }
}

/// The node cleaned up a run whose exit it reported early: its capacity is free again.
fn apply_released(st: &mut State, node_id: &str, msg: &RunReleased) -> Effect {
    if st.release_stale(node_id, &msg.run_id) {
        return Effect::StoreAndPlace;
    }
    tracing::debug!(run_id = %msg.run_id, node_id, lease_epoch = msg.lease_epoch, "release of a run that held nothing");
    Effect::Nothing
}

/// What applying a report left to do; a batch does the most any of its reports needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Effect {
    /// Nothing staged (a re-sent report).
    Nothing,
    /// Store what was staged and send what was queued for agents.
    Store,
    /// The same, after a placement pass: capacity (a node's or a capped runner's) was freed.
    StoreAndPlace,
}

/// A report about one run, which [`Scheduler::run_reports`] handles in batches.
#[derive(Debug, Clone)]
pub enum RunReport {
    Started(RunStarted),
    Exited(RunExited),
    Released(RunReleased),
}

impl RunReport {
    /// The report if it is about a run; any other is given back (moved, as the `Ok` is).
    #[allow(clippy::result_large_err)]
    pub fn from_report(report: AgentReport) -> Result<RunReport, AgentReport> {
        match report {
            AgentReport::RunStarted(m) => Ok(RunReport::Started(m)),
            AgentReport::RunExited(m) => Ok(RunReport::Exited(m)),
            AgentReport::RunReleased(m) => Ok(RunReport::Released(m)),
            other => Err(other),
        }
    }
}

pub(super) fn nanos_to_millis(n: i64) -> i64 {
    if n > 0 {
        n / 1_000_000
    } else {
        now_unix_millis()
    }
}
