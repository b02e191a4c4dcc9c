//! Idempotency keys expire: [`Config::idempotency_ttl`](super::Config) after the run they
//! created, a retry with the same key creates a new run, and the key is deleted.
//!
//! When a key was created needs no extra field: the key's value is the id of the run it
//! created, a UUIDv7, whose first 48 bits are its creation time in unix milliseconds. Expiry is
//! enforced in two ways, so that neither the hot path nor a sweep ever scans every key:
//! - lazily, on use: `create_run_with_key` treats an expired key as absent and overwrites it;
//! - by a bounded periodic sweep ([`Scheduler::sweep_idempotency`]) for keys nobody retries:
//!   each key has an entry under `idempotency_expiry/<run id>`, and since run ids order by
//!   creation, one range read up to the id of "now − TTL" lists exactly the expired keys,
//!   oldest first. A sweep deletes at most [`SWEEP_PAGES`] × [`SWEEP_PAGE`] keys, one small
//!   transaction per page.
//!
//! Keys written by a build without expiry entries still expire on use, but only the sweep
//! deletes keys, so those stay stored until they are reused.
//!
//! In memory, the keys used since start (`State::idempotency`, which covers a retry that races
//! the first request before its write is durable) are dropped once expired, oldest first, so
//! that map stays as small as one TTL's worth of keys.

use super::{committed, encode, Scheduler, State};
use crate::error::SchedulerError;
use berth_core::keys;
use berth_core::store::{Expect, Store};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Expiry entries handled per sweep transaction (two deletes each: under etcd's 128 operations).
pub(super) const SWEEP_PAGE: usize = 50;
/// Pages per sweep call, so one call is bounded however many keys have expired.
pub(super) const SWEEP_PAGES: usize = 40;

/// The value of an `idempotency_expiry/<run id>` entry: which key to delete.
#[derive(Debug, Serialize, Deserialize)]
struct ExpiryEntry {
    runner_id: String,
    key_hash: String,
}

/// When run `run_id` was created (unix millis), read from its UUIDv7; `None` for an id of
/// another form (such a key never expires).
pub(super) fn created_at_millis(run_id: &str) -> Option<i64> {
    let id = uuid::Uuid::parse_str(run_id).ok()?;
    if id.get_version_num() != 7 {
        return None;
    }
    i64::try_from(id.as_u128() >> 80).ok()
}

fn ttl_millis(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

/// Whether the idempotency key that created run `run_id` has expired at `now` (unix millis).
pub(super) fn expired(run_id: &str, now: i64, ttl: Duration) -> bool {
    created_at_millis(run_id).is_some_and(|at| at.saturating_add(ttl_millis(ttl)) <= now)
}

/// A string that sorts after the id of every run whose key has expired at `now` and before
/// every other UUIDv7 id: the UUID of the first millisecond not yet expired, other bits zero.
fn expiry_bound(now: i64, ttl: Duration) -> String {
    let first_live = now.saturating_sub(ttl_millis(ttl)).saturating_add(1).max(0);
    let millis = u128::try_from(first_live).unwrap_or_default() & ((1 << 48) - 1);
    uuid::Uuid::from_u128(millis << 80).to_string()
}

impl State {
    /// The run a live key created, from the keys used since start.
    pub(super) fn idempotent_run(
        &self,
        runner_id: &str,
        key_hash: &str,
        now: i64,
        ttl: Duration,
    ) -> Option<String> {
        self.idempotency
            .get(&(runner_id.to_owned(), key_hash.to_owned()))
            .filter(|run_id| !expired(run_id, now, ttl))
            .cloned()
    }

    /// Stages key `key_hash` of `runner_id` as creating run `run_id`, and its expiry entry.
    /// `replaces` says a stored (expired) key is overwritten; otherwise it must be absent.
    pub(super) fn stage_idempotency_key(
        &mut self,
        runner_id: &str,
        key_hash: &str,
        run_id: &str,
        replaces: bool,
    ) {
        let map_key = (runner_id.to_owned(), key_hash.to_owned());
        // An expired key in memory may be one whose write this process already committed.
        let replaces = replaces || self.idempotency.contains_key(&map_key);
        self.idempotency.insert(map_key.clone(), run_id.to_owned());
        self.idempotency_order
            .push_back((run_id.to_owned(), map_key.0, map_key.1));
        let expect = if replaces {
            Expect::Any
        } else {
            Expect::Absent
        };
        self.write(
            keys::idempotency(runner_id, key_hash),
            run_id.as_bytes().to_vec(),
            expect,
        );
        self.write(
            keys::idempotency_expiry(run_id),
            encode(&ExpiryEntry {
                runner_id: runner_id.to_owned(),
                key_hash: key_hash.to_owned(),
            }),
            Expect::Absent,
        );
    }

    /// Forgets the expired keys in memory, oldest first (amortised O(1) per key).
    pub(super) fn prune_idempotency(&mut self, now: i64, ttl: Duration) {
        while let Some((run_id, runner_id, key_hash)) = self.idempotency_order.front() {
            if !expired(run_id, now, ttl) {
                break;
            }
            let map_key = (runner_id.clone(), key_hash.clone());
            if self.idempotency.get(&map_key) == Some(run_id) {
                self.idempotency.remove(&map_key);
            }
            self.idempotency_order.pop_front();
        }
    }
}

impl<S: Store> Scheduler<S> {
    /// Deletes idempotency keys expired at `now` (unix millis; a parameter so tests control the
    /// clock), at most [`SWEEP_PAGES`] pages of [`SWEEP_PAGE`]; returns how many keys went.
    /// A key reused since its expiry entry was written (it now names a newer run) stays.
    pub async fn sweep_idempotency(&self, now: i64) -> Result<usize, SchedulerError> {
        let ttl = self.config.idempotency_ttl;
        let end = keys::idempotency_expiry(&expiry_bound(now, ttl));
        let mut swept = 0;
        for _ in 0..SWEEP_PAGES {
            let page = self
                .store
                .range(keys::IDEMPOTENCY_EXPIRY, &end, SWEEP_PAGE)
                .await?;
            // Read outside the lock: which run each key names now.
            let mut found = Vec::with_capacity(page.len());
            for kv in &page {
                let run_id = kv
                    .key
                    .strip_prefix(keys::IDEMPOTENCY_EXPIRY)
                    .unwrap_or_default()
                    .to_owned();
                // An entry that does not decode names no key: it just goes.
                let entry: Option<ExpiryEntry> = serde_json::from_slice(&kv.value).ok();
                let current = match &entry {
                    Some(e) => self
                        .store
                        .get(&keys::idempotency(&e.runner_id, &e.key_hash))
                        .await?
                        .map(|kv| kv.value),
                    None => None,
                };
                found.push((kv.key.clone(), run_id, entry, current));
            }
            let done = {
                let mut st = self.state.lock().await;
                for (expiry_key, run_id, entry, current) in found {
                    if let Some(e) = entry {
                        let map_key = (e.runner_id, e.key_hash);
                        // A create reusing the key since the read above shows in memory first.
                        let reused = st.idempotency.get(&map_key).is_some_and(|r| *r != run_id);
                        if !reused && current.as_deref() == Some(run_id.as_bytes()) {
                            st.delete(keys::idempotency(&map_key.0, &map_key.1));
                            swept += 1;
                        }
                        if st.idempotency.get(&map_key) == Some(&run_id) {
                            st.idempotency.remove(&map_key);
                        }
                    }
                    st.delete(expiry_key);
                }
                self.flush(&mut st)
            };
            committed(done).await?;
            if page.len() < SWEEP_PAGE {
                break;
            }
        }
        if swept > 0 {
            tracing::info!(keys = swept, "expired idempotency keys deleted");
        }
        Ok(swept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_expires_one_ttl_after_its_run_was_created() {
        let id = uuid::Uuid::now_v7().to_string();
        let at = created_at_millis(&id).expect("a v7 id has a time");
        let ttl = Duration::from_secs(3600);
        assert!(!expired(&id, at, ttl));
        assert!(!expired(&id, at + 3_599_999, ttl));
        assert!(expired(&id, at + 3_600_000, ttl));
        assert!(
            !expired("not-a-uuid", i64::MAX, ttl),
            "unknown ids never expire"
        );
        let v4 = uuid::Uuid::new_v4().to_string();
        assert!(!expired(&v4, i64::MAX, ttl));
    }

    #[test]
    fn the_bound_splits_expired_ids_from_live_ones() {
        let ttl = Duration::from_secs(60);
        for _ in 0..100 {
            let id = uuid::Uuid::now_v7().to_string();
            let at = created_at_millis(&id).expect("time");
            let live = expiry_bound(at + 59_999, ttl);
            let gone = expiry_bound(at + 60_000, ttl);
            assert!(id > live, "{id} still live at +59.999 s (bound {live})");
            assert!(id < gone, "{id} expired at +60 s (bound {gone})");
        }
        assert_eq!(expiry_bound(0, ttl), "00000000-0000-0000-0000-000000000000");
    }
}
