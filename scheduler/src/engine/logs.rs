//! Run logs: storing the lines agents report (redacted, each exactly once, in compressed chunks
//! that expire after the log retention) and reading them back a page at a time.
//!
//! Layout in the store: see [`berth_core::log_chunks`]. A re-sent batch (after a reconnect, a
//! scheduler failover, or an agent restart that re-reads its journal and may cut its batches
//! differently) is checked against the chunks already stored: only lines no chunk holds are
//! written, so each line is stored once. That check and the write are serialised per run (see
//! [`AppendLocks`]), so two deliveries of one batch cannot both pass it.

use super::{Scheduler, State};
use crate::error::SchedulerError;
use berth_core::agent::LogBatch;
use berth_core::log_chunks::{self, ReadError, Span, READ_CHUNKS};
use berth_core::model::LogEntry;
use berth_core::store::{KeyValue, Store};
use berth_core::{keys, Run};
use std::collections::HashMap;
use std::sync::Arc;

/// Serialises the appends of each run: one entry per run with an append in progress or a
/// commit on its way (the entry goes with its last user), so appends of different runs never
/// wait for each other.
#[derive(Default)]
pub(super) struct AppendLocks(std::sync::Mutex<HashMap<String, Arc<RunAppends>>>);

/// One run's appends: the lock held while checking and submitting, and the spans submitted
/// and not yet durable.
#[derive(Default)]
struct RunAppends {
    lock: Arc<tokio::sync::Mutex<()>>,
    pending: std::sync::Mutex<Vec<Span>>,
}

impl RunAppends {
    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<Span>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A use of one run's entry: while held, the entry stays in the map. Dropping the last use
/// frees it.
struct RunUse<'a> {
    locks: &'a AppendLocks,
    run_id: String,
    entry: Arc<RunAppends>,
}

impl AppendLocks {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<RunAppends>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The run's entry, and its lock once it is this caller's turn.
    async fn lock(&self, run_id: &str) -> (RunUse<'_>, tokio::sync::OwnedMutexGuard<()>) {
        let entry = self.map().entry(run_id.to_owned()).or_default().clone();
        let held = entry.lock.clone().lock_owned().await;
        let user = RunUse {
            locks: self,
            run_id: run_id.to_owned(),
            entry,
        };
        (user, held)
    }
}

#[cfg(test)]
impl AppendLocks {
    /// Runs with an entry (held, awaited or committing).
    pub(super) fn in_use(&self) -> usize {
        self.map().len()
    }
}

impl Drop for RunUse<'_> {
    fn drop(&mut self) {
        let mut map = self.locks.map();
        // The map's reference and this one: nobody else holds, awaits or commits for the run.
        if map
            .get(&self.run_id)
            .is_some_and(|l| Arc::ptr_eq(l, &self.entry) && Arc::strong_count(l) == 2)
        {
            map.remove(&self.run_id);
        }
    }
}

/// The wait until a staged batch is durable ([`Scheduler::stage_logs`]); resolves to what
/// [`Scheduler::append_logs`] would have returned.
pub type LogsCommit<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), SchedulerError>> + Send + 'a>>;

/// The commit of a batch with nothing to store.
fn nothing_to_store() -> LogsCommit<'static> {
    Box::pin(std::future::ready(Ok(())))
}

fn corrupt(kv: &KeyValue, e: log_chunks::ChunkError) -> SchedulerError {
    SchedulerError::Corrupt {
        key: kv.key.clone(),
        reason: e.to_string(),
    }
}

impl<S: Store> Scheduler<S> {
    /// Stores `batch`: [`Scheduler::stage_logs`], then waits until it is durable.
    pub async fn append_logs(&self, node_id: &str, batch: LogBatch) -> Result<(), SchedulerError> {
        self.stage_logs(node_id, batch).await?.await
    }

    /// Checks which of `batch`'s lines are to be stored and submits them; the returned future
    /// waits until they are durable. Batches staged one after the other are applied in that
    /// order; a later batch of the same run counts this one's lines as stored from the moment
    /// it is staged.
    pub async fn stage_logs(
        &self,
        node_id: &str,
        mut batch: LogBatch,
    ) -> Result<LogsCommit<'_>, SchedulerError> {
        let (Some(first), Some(last)) = (
            batch.lines.iter().map(|l| l.seq).filter(|s| *s > 0).min(),
            batch.lines.iter().map(|l| l.seq).max(),
        ) else {
            return Ok(nothing_to_store());
        };
        let (user, serial) = self.log_appends.lock(&batch.run_id).await;
        // The spans on their way are read *before* the store: a commit that lands in between
        // is then either still listed here or already in the store (its spans leave the list
        // only once it is durable). Read the other way round, a batch could miss both, store
        // lines again and overwrite a chunk that ends on the same line with one that holds
        // fewer lines (chunk writes are unconditional).
        let on_the_way: Vec<Span> = user.entry.pending().clone();
        let mut stored = log_chunks::stored_spans(&self.store, &batch.run_id, first, last)
            .await
            .map_err(|e| match e {
                ReadError::Store(e) => e.into(),
                ReadError::Corrupt { key, source } => SchedulerError::Corrupt {
                    key,
                    reason: source.to_string(),
                },
            })?;
        stored.extend(on_the_way);
        // Only lines of a run that has not ended, from the node that holds its lease, are
        // stored. The agent sends every line of a run before its `RunExited` on one ordered
        // stream, and the stream is handled in order, so a run that ended by its node's report
        // already has all its lines: whatever comes later is a re-send of stored lines. A run
        // that ended otherwise (its node was lost or restarted, it was canceled before it
        // started) is final: lines its old node still sends were written after that end and
        // are dropped, as are lines from any node that does not hold the lease. The check and
        // the submission happen in one hold of the engine lock, so the lines take their place
        // in the commit order before any final state staged after the check; redaction,
        // chunking and compression need no engine state and run outside it.
        let count = batch.lines.len();
        let Some(secrets) = self
            .log_holder(&*self.state.lock().await, &batch.run_id, count, node_id)
            .map(secret_values)
        else {
            return Ok(nothing_to_store());
        };
        let lines: Vec<LogEntry> = std::mem::take(&mut batch.lines)
            .into_iter()
            .map(|line| {
                let mut msg = line.msg;
                for secret in &secrets {
                    if msg.contains(secret.as_str()) {
                        msg = msg.replace(secret.as_str(), REDACTED);
                    }
                }
                LogEntry {
                    id: line.seq,
                    stream: line.stream,
                    msg,
                    ts_unix_nanos: line.ts_unix_nanos,
                }
            })
            .collect();
        let chunks = log_chunks::plan(lines, &stored);
        let spans: Vec<Span> = chunks
            .iter()
            .filter_map(|c| {
                Some(Span {
                    first: c.first()?.id,
                    last: c.last()?.id,
                })
            })
            .collect();
        let txns = log_chunks::txns(&batch.run_id, chunks, self.config.log_retention);
        let st = self.state.lock().await;
        if self
            .log_holder(&st, &batch.run_id, count, node_id)
            .is_none()
        {
            return Ok(nothing_to_store());
        }
        let commits: Vec<_> = txns.into_iter().map(|txn| self.store.submit(txn)).collect();
        drop(st);
        user.entry.pending().extend(spans.iter().copied());
        drop(serial);
        Ok(Box::pin(async move {
            let mut result = Ok(());
            for commit in commits {
                if let Err(e) = commit.await {
                    result = Err(e.into());
                    break;
                }
            }
            // Durable: the store has the spans now. Failed: the agent sends them again (the
            // session ends), and they must not count as stored.
            user.entry
                .pending()
                .retain(|p| !spans.iter().any(|s| s == p));
            drop(user);
            if result.is_ok() {
                self.notify();
            }
            result
        }))
    }

    /// The run `run_id` (a batch of `lines` lines arrived for it), if its lines are to be
    /// stored: it has not ended and `node_id` holds its lease.
    fn log_holder<'a>(
        &self,
        st: &'a State,
        run_id: &str,
        lines: usize,
        node_id: &str,
    ) -> Option<&'a Run> {
        let run = st
            .active
            .get(run_id)
            .filter(|c| c.node_id.as_deref() == Some(node_id));
        if run.is_none() {
            tracing::debug!(
                run_id,
                node_id,
                lines,
                "dropping logs for a run that has ended or that this node does not hold"
            );
        }
        run
    }

    /// Lines after `after_id`, oldest first, at most `limit` and about [`LOG_PAGE_MAX_BYTES`];
    /// and whether more follow. The run must be `runner_id`'s and in `project`.
    pub async fn list_logs(
        &self,
        project: &str,
        runner_id: &str,
        run_id: &str,
        after_id: u64,
        limit: usize,
    ) -> Result<(Vec<LogEntry>, bool), SchedulerError> {
        self.list_logs_within(
            project,
            runner_id,
            run_id,
            after_id,
            limit,
            LOG_PAGE_MAX_BYTES,
        )
        .await
    }

    /// [`Scheduler::list_logs`] with a page of at most `max_bytes` ([`log_line_cost`] each),
    /// but always at least one line, so paging moves on whatever a line's length. The store is
    /// read a few chunks at a time, so a page of long lines never holds more than it returns.
    pub async fn list_logs_within(
        &self,
        project: &str,
        runner_id: &str,
        run_id: &str,
        after_id: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<LogEntry>, bool), SchedulerError> {
        let (run, _) = self.load_run(run_id).await?;
        if run.runner_id != runner_id || run.project != project {
            return Err(SchedulerError::NotFound {
                kind: "run",
                id: run_id.to_owned(),
            });
        }
        let end = keys::prefix_end(&keys::logs_prefix(run_id));
        let mut logs: Vec<LogEntry> = Vec::new();
        let mut bytes = 0usize;
        // The chunk holding the line after `after_id` is the first keyed at or after it.
        let mut next = after_id.saturating_add(1);
        loop {
            let kvs = self
                .store
                .range(&keys::log(run_id, next), &end, READ_CHUNKS)
                .await?;
            for kv in &kvs {
                for entry in log_chunks::decode(&kv.value).map_err(|e| corrupt(kv, e))? {
                    if entry.id < next {
                        continue; // before `after_id`, in the first chunk read
                    }
                    let cost = log_line_cost(&entry);
                    if logs.len() >= limit || (!logs.is_empty() && bytes + cost > max_bytes) {
                        return Ok((logs, true));
                    }
                    bytes += cost;
                    next = entry.id.saturating_add(1);
                    logs.push(entry);
                }
                let span = log_chunks::span(&kv.value).map_err(|e| corrupt(kv, e))?;
                next = next.max(span.last.saturating_add(1));
            }
            if kvs.len() < READ_CHUNKS {
                return Ok((logs, false));
            }
        }
    }
}

/// The most a page of logs holds, counted by [`log_line_cost`]: a quarter of gRPC's default
/// 4 MiB message limit, which the API's client of `ListLogs` keeps. A single line is at most
/// about 1 MiB (the agent's outbox bounds it), so even a page of one line fits.
pub const LOG_PAGE_MAX_BYTES: usize = 1024 * 1024;

/// What a line costs in a page: its text and room for its id, stream, timestamp and framing.
pub fn log_line_cost(line: &LogEntry) -> usize {
    line.msg.len() + 32
}

/// The values of the run's secret variables worth redacting (see `REDACT_MIN_LEN`).
fn secret_values(run: &Run) -> Vec<String> {
    let mut values: Vec<String> = run
        .env
        .iter()
        .filter(|e| e.secret && e.env_val.chars().count() >= REDACT_MIN_LEN)
        .map(|e| e.env_val.clone())
        .collect();
    // Longest first, so a secret containing another is redacted whole.
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values
}

/// What a secret value is replaced with in stored log lines.
pub const REDACTED: &str = "[redacted]";
/// Shorter secret values are not redacted (redacting every `a` would garble the logs and still
/// leak nothing a 3-character secret protects).
pub const REDACT_MIN_LEN: usize = 4;
