//! The index of runs that have not ended (`active_runs/<run id>`, see [`keys::active_run`]):
//! what `stage` keeps in step with the run records, and what `open` loads instead of every run
//! ever stored, so that starting (or taking over as leader) costs the active runs only, however
//! long the history.
//!
//! `stage` is the one place a run record is written, so it is the one place the index changes:
//! a run that enters a non-terminal state gets its entry, a run that ends loses it, in the same
//! transaction as the record. A store written by an older build has no index: `open` builds it
//! once with one scan of `runs/` and then writes [`keys::ACTIVE_RUNS_INDEXED`], so it never
//! scans again.

use super::{decode, Scheduler, State};
use crate::error::SchedulerError;
use berth_core::store::{Expect, Store, Txn};
use berth_core::{keys, Run};
use futures::{StreamExt, TryStreamExt};
use std::collections::BTreeMap;

/// Writes per transaction while building or repairing the index: under etcd's default limit of
/// 128 operations per request.
const INDEX_TXN_OPS: usize = 100;
/// Run records per range request while building the index.
const BUILD_SCAN_PAGE: usize = 500;
/// Run records read at once while loading the active runs (a round trip each on etcd).
const LOAD_CONCURRENCY: usize = 64;

impl State {
    /// Stages the index entry's change for `run`, which `stage` is about to store: `was_active`
    /// says whether the run had not ended before this write.
    pub(super) fn stage_active_index(&mut self, run: &Run, was_active: bool) {
        match (was_active, run.status.is_terminal()) {
            (false, false) => {
                self.write(keys::active_run(&run.id), Vec::new(), Expect::Any);
            }
            (true, true) => self.delete(keys::active_run(&run.id)),
            // Still active (its entry stays), or ended already (it has none).
            _ => {}
        }
    }
}

impl<S: Store> Scheduler<S> {
    /// How many runs have not ended (what `open` loaded, plus what happened since).
    pub async fn active_run_count(&self) -> usize {
        self.state.lock().await.active.len()
    }

    /// Every run that has not ended, by id, with its files' contents restored (the node that
    /// runs it needs them). Reads only the runs the index names; builds the index first if the
    /// store predates it. An entry whose run is gone or has ended (left by a build that did not
    /// keep the index) is dropped from the index.
    pub(super) async fn load_active_runs(
        store: &S,
    ) -> Result<BTreeMap<String, Run>, SchedulerError> {
        if store.get(keys::ACTIVE_RUNS_INDEXED).await?.is_none() {
            Self::build_active_index(store).await?;
        }
        let ids: Vec<String> = store
            .list_prefix(keys::ACTIVE_RUNS)
            .await?
            .into_iter()
            .filter_map(|kv| kv.key.strip_prefix(keys::ACTIVE_RUNS).map(str::to_owned))
            .collect();
        let loaded: Vec<(String, Option<Run>)> = futures::stream::iter(ids)
            .map(|id| async move {
                let run = Self::load_active_run(store, &id).await?;
                Ok::<_, SchedulerError>((id, run))
            })
            .buffered(LOAD_CONCURRENCY)
            .try_collect()
            .await?;
        let mut active = BTreeMap::new();
        let mut stale = Vec::new();
        for (id, run) in loaded {
            match run {
                Some(run) => {
                    active.insert(id, run);
                }
                None => stale.push(keys::active_run(&id)),
            }
        }
        if !stale.is_empty() {
            tracing::warn!(
                entries = stale.len(),
                "dropping index entries of runs that have ended or are gone"
            );
            for chunk in stale.chunks(INDEX_TXN_OPS) {
                let txn = chunk
                    .iter()
                    .fold(Txn::new(), |t, key| t.delete(key.clone(), Expect::Any));
                store.commit(txn).await?;
            }
        }
        Ok(active)
    }

    /// The run `id` if it exists and has not ended, with its files' contents.
    async fn load_active_run(store: &S, id: &str) -> Result<Option<Run>, SchedulerError> {
        let key = keys::run(id);
        let Some(kv) = store.get(&key).await? else {
            return Ok(None);
        };
        let mut run: Run = decode(&key, &kv.value)?;
        if run.status.is_terminal() {
            return Ok(None);
        }
        if !run.files.is_empty() {
            let key = keys::run_files(&run.id);
            let value = store.get(&key).await?.map(|kv| kv.value);
            run.restore_file_contents(value.as_deref().unwrap_or_default())
                .map_err(|e| SchedulerError::Corrupt {
                    key,
                    reason: e.to_string(),
                })?;
        }
        Ok(Some(run))
    }

    /// The one scan of every run, for a store written before the index existed: an entry for
    /// each run that has not ended, then the marker that the index is complete. Safe to repeat
    /// if interrupted (the entries are plain puts and the marker comes last).
    async fn build_active_index(store: &S) -> Result<(), SchedulerError> {
        // In pages: one range over a long history can exceed a response limit (etcd's client
        // refuses messages above 4 MiB, about 3,000 sealed run records).
        let mut entries = Vec::new();
        let end = keys::prefix_end(keys::RUNS);
        let mut start = keys::RUNS.to_owned();
        loop {
            let page = store.range(&start, &end, BUILD_SCAN_PAGE).await?;
            for kv in &page {
                let run: Run = decode(&kv.key, &kv.value)?;
                if !run.status.is_terminal() {
                    entries.push(keys::active_run(&run.id));
                }
            }
            match page.last() {
                // The next key after `last`.
                Some(last) if page.len() == BUILD_SCAN_PAGE => start = format!("{}\0", last.key),
                _ => break,
            }
        }
        for chunk in entries.chunks(INDEX_TXN_OPS) {
            let txn = chunk.iter().fold(Txn::new(), |t, key| {
                t.put(key.clone(), Vec::new(), Expect::Any)
            });
            store.commit(txn).await?;
        }
        store
            .commit(Txn::new().put(keys::ACTIVE_RUNS_INDEXED, b"1".to_vec(), Expect::Any))
            .await?;
        tracing::info!(
            active_runs = entries.len(),
            "built the index of active runs (once, for a store written by an older build)"
        );
        Ok(())
    }
}
