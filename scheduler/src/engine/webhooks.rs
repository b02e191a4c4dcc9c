//! Run-ended webhooks (issue #15): when a run of a runner with `notify` ends, `stage` stores its
//! [`Delivery`] under `webhooks/pending/<run id>` **in the same unit of writes as the end**, so a
//! failover finds both or neither. The leader keeps the pending deliveries in memory (`open`
//! loads them: only pending ones, so startup does not grow with history) and its delivery loop
//! (`crate::webhooks`) takes the due ones ([`Scheduler::due_webhooks`]), sends them, and records
//! each attempt ([`Scheduler::webhook_attempted`]): still pending → the record is rewritten
//! with its next attempt time; delivered or failed → it moves to `webhooks/done/<run id>`. A run
//! read on its own shows its delivery (`Run::notification`).
//!
//! Deliveries are at least once: an attempt in flight when the leader changes is made again by
//! the next leader (receivers dedupe on `Berth-Event-Id`).

use super::{decode, encode, Scheduler, State};
use crate::error::SchedulerError;
use berth_core::store::{Expect, Store};
use berth_core::webhook::{Attempt, Delivery, DeliveryStatus, Notify};
use berth_core::{keys, Run};
use std::collections::{BTreeSet, HashMap};

/// The runners' notify settings and the pending deliveries (part of the engine's `State`).
#[derive(Default)]
pub(super) struct Webhooks {
    /// Runner id → its notify settings and the runner record's revision they come from.
    notify: HashMap<String, (Notify, u64)>,
    /// Runner id → the revision of its last removal of `notify` (a tombstone: an older answer
    /// that sets it must not bring it back).
    removed: HashMap<String, u64>,
    /// Pending deliveries by run id.
    pending: HashMap<String, Delivery>,
    /// (next attempt time, run id) of the pending deliveries not in flight (an attempt being
    /// made is in neither: its result puts it back or settles it).
    due: BTreeSet<(i64, String)>,
}

impl Webhooks {
    /// A runner's notify settings as of its record's `revision` (an older answer never
    /// overwrites a newer one).
    pub(super) fn set(&mut self, runner_id: &str, notify: Option<Notify>, revision: u64) {
        let newest = self
            .notify
            .get(runner_id)
            .map(|(_, r)| *r)
            .max(self.removed.get(runner_id).copied());
        if newest.is_some_and(|r| r > revision) {
            return;
        }
        match notify {
            Some(n) => {
                self.removed.remove(runner_id);
                self.notify.insert(runner_id.to_owned(), (n, revision));
            }
            None => {
                self.notify.remove(runner_id);
                self.removed.insert(runner_id.to_owned(), revision);
            }
        }
    }

    fn add(&mut self, d: Delivery) {
        if let Some(at) = d.next_attempt_at {
            self.due.insert((at, d.run_id.clone()));
        }
        self.pending.insert(d.run_id.clone(), d);
    }
}

impl State {
    /// Stages the delivery of `run`'s end, if its runner notifies (called by `stage_one` for a
    /// run that ends now, inside its unit).
    pub(super) fn notify_end(&mut self, run: &Run) {
        let Some((notify, _)) = self.webhooks.notify.get(&run.runner_id) else {
            return;
        };
        let delivery = Delivery::new(run, notify, berth_core::now_unix_millis());
        self.write(
            keys::webhook_pending(&run.id),
            encode(&delivery),
            Expect::Any,
        );
        self.webhooks.add(delivery);
    }

    pub(super) fn set_notify(&mut self, runner_id: &str, notify: Option<Notify>, revision: u64) {
        self.webhooks.set(runner_id, notify, revision);
    }
}

impl<S: Store> Scheduler<S> {
    /// The pending deliveries (at `open`).
    pub(super) async fn load_webhooks(
        store: &S,
        webhooks: &mut Webhooks,
    ) -> Result<(), SchedulerError> {
        for kv in store.list_prefix(keys::WEBHOOKS_PENDING).await? {
            let d: Delivery = decode(&kv.key, &kv.value)?;
            webhooks.add(d);
        }
        Ok(())
    }

    /// Takes the deliveries due at `now` (unix ms), at most `max`, and marks them in flight.
    pub async fn due_webhooks(&self, now: i64, max: usize) -> Vec<Delivery> {
        let mut st = self.state.lock().await;
        let w = &mut st.webhooks;
        let mut out = Vec::new();
        while out.len() < max {
            let Some(first) = w.due.first().cloned() else {
                break;
            };
            if first.0 > now {
                break;
            }
            w.due.remove(&first);
            if let Some(d) = w.pending.get(&first.1) {
                out.push(d.clone());
            }
        }
        out
    }

    /// Records an attempt of `run_id`'s delivery and stores where it stands.
    pub async fn webhook_attempted(
        &self,
        run_id: &str,
        attempt: Attempt,
    ) -> Result<(), SchedulerError> {
        let mut st = self.state.lock().await;
        let Some(mut d) = st.webhooks.pending.remove(run_id) else {
            return Ok(());
        };
        d.record(attempt);
        match d.status {
            DeliveryStatus::Pending => {
                st.write(keys::webhook_pending(run_id), encode(&d), Expect::Any);
                st.webhooks.add(d);
            }
            DeliveryStatus::Delivered | DeliveryStatus::Failed => {
                tracing::info!(
                    run_id,
                    status = d.status.as_str(),
                    attempts = d.attempts_made,
                    "run-ended webhook settled"
                );
                st.begin_unit();
                st.delete(keys::webhook_pending(run_id));
                st.write(keys::webhook_done(run_id), encode(&d), Expect::Any);
            }
        }
        self.settle(st, false).await
    }

    /// The delivery of `run_id`'s end, if there is one (pending or done).
    pub(super) async fn webhook_of(
        &self,
        run_id: &str,
    ) -> Result<Option<Delivery>, SchedulerError> {
        if let Some(d) = self.state.lock().await.webhooks.pending.get(run_id) {
            return Ok(Some(d.clone()));
        }
        let key = keys::webhook_done(run_id);
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some(decode(&key, &kv.value)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notify(url: &str) -> Notify {
        Notify {
            url: url.to_owned(),
            secret: "0123456789abcdef".to_owned(),
        }
    }

    #[test]
    fn an_older_answer_never_overwrites_a_newer_one_removal_included() {
        let mut w = Webhooks::default();
        w.set("r", Some(notify("http://a.example/")), 10);
        w.set("r", None, 12);
        // A PATCH that committed earlier (rev 11) but reached the engine later.
        w.set("r", Some(notify("http://b.example/")), 11);
        assert!(!w.notify.contains_key("r"), "the removal at 12 stands");
        w.set("r", Some(notify("http://c.example/")), 13);
        assert_eq!(
            w.notify.get("r").map(|(n, _)| n.url.as_str()),
            Some("http://c.example/")
        );
        w.set("r", Some(notify("http://d.example/")), 9);
        assert_eq!(
            w.notify.get("r").map(|(n, _)| n.url.as_str()),
            Some("http://c.example/")
        );
    }
}
