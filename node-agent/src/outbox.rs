//! At-least-once delivery to the scheduler. Every report (RunStarted, RunExited, LogBatch) gets
//! the next `seq` and stays here until a cumulative `Ack.up_to_seq` covers it; after a reconnect
//! the whole remaining outbox is sent again.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use berth_proto::v1::{agent_message::Body, AgentMessage};
use tokio::sync::Notify;

/// The queue of unacknowledged messages.
#[derive(Debug, Default)]
pub struct Outbox {
    next_seq: u64,
    entries: VecDeque<AgentMessage>,
}

impl Outbox {
    pub fn new() -> Self {
        Self {
            next_seq: 1,
            entries: VecDeque::new(),
        }
    }

    /// Queues `body` under the next sequence number and returns that number.
    pub fn push(&mut self, body: Body) -> u64 {
        let seq = self.next_seq.max(1);
        self.next_seq = seq + 1;
        self.entries.push_back(AgentMessage {
            seq,
            body: Some(body),
        });
        seq
    }

    /// Drops every entry with `seq <= up_to_seq` and returns them. Acks are cumulative, so an
    /// old (smaller) ack arriving late changes nothing.
    pub fn ack(&mut self, up_to_seq: u64) -> Vec<AgentMessage> {
        let mut acked = Vec::new();
        while self.entries.front().is_some_and(|m| m.seq <= up_to_seq) {
            acked.extend(self.entries.pop_front());
        }
        acked
    }

    /// Entries with `seq > after`, in order: `after = 0` gives the whole outbox (used right
    /// after registering), otherwise only what the current connection has not sent yet.
    pub fn unsent_after(&self, after: u64) -> Vec<AgentMessage> {
        self.entries
            .iter()
            .filter(|m| m.seq > after)
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The highest sequence number handed out so far (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }
}

/// The outbox shared by run supervisors (producers) and the scheduler session (consumer).
#[derive(Debug, Clone, Default)]
pub struct SharedOutbox {
    inner: Arc<Mutex<Outbox>>,
    changed: Arc<Notify>,
    /// Ephemeral reports (seq 0, never acknowledged or re-sent), the latest per key: a newer
    /// one replaces an unsent older one, and what is unsent while disconnected is dropped.
    ephemeral: Arc<Mutex<std::collections::BTreeMap<String, Body>>>,
}

impl SharedOutbox {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Outbox::new())),
            changed: Arc::new(Notify::new()),
            ephemeral: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Outbox> {
        // A panic while holding this lock cannot leave the queue inconsistent (every method is a
        // single VecDeque operation), so recover from poisoning instead of propagating it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, body: Body) -> u64 {
        let seq = self.lock().push(body);
        self.changed.notify_one();
        seq
    }

    /// Drops what `up_to_seq` acknowledges and returns it.
    pub fn ack(&self, up_to_seq: u64) -> Vec<AgentMessage> {
        self.lock().ack(up_to_seq)
    }

    pub fn unsent_after(&self, after: u64) -> Vec<AgentMessage> {
        self.lock().unsent_after(after)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// True once `seq` was handed out and acknowledged.
    pub fn is_acked(&self, seq: u64) -> bool {
        let outbox = self.lock();
        seq <= outbox.last_seq() && !outbox.entries.iter().any(|m| m.seq == seq)
    }

    /// Resolves after the next `push`.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Queues an ephemeral report under `key`, replacing an unsent one with the same key.
    pub fn push_ephemeral(&self, key: String, body: Body) {
        self.ephemeral
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, body);
        self.changed.notify_one();
    }

    /// Takes the ephemeral reports to send now (seq 0).
    pub fn take_ephemeral(&self) -> Vec<AgentMessage> {
        let taken = std::mem::take(&mut *self.ephemeral.lock().unwrap_or_else(|e| e.into_inner()));
        taken
            .into_values()
            .map(|body| AgentMessage {
                seq: 0,
                body: Some(body),
            })
            .collect()
    }

    /// A copy of every queued message, for tests and diagnostics.
    pub fn snapshot(&self) -> Vec<AgentMessage> {
        self.lock().unsent_after(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::v1::{LogBatch, RunStarted};

    fn started(id: &str) -> Body {
        Body::RunStarted(RunStarted {
            run_id: id.to_string(),
            ..Default::default()
        })
    }

    #[test]
    fn seqs_grow_from_one() {
        let mut o = Outbox::new();
        assert_eq!(o.push(started("a")), 1);
        assert_eq!(o.push(started("b")), 2);
        assert_eq!(o.last_seq(), 2);
    }

    #[test]
    fn ack_is_cumulative_and_idempotent() {
        let mut o = Outbox::new();
        for i in 0..5 {
            o.push(Body::LogBatch(LogBatch {
                run_id: format!("r{i}"),
                lines: vec![],
            }));
        }
        assert_eq!(
            o.ack(3).iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(
            o.unsent_after(0).iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![4, 5]
        );
        o.ack(1); // late, smaller ack: no effect
        assert_eq!(o.len(), 2);
        o.ack(100);
        assert!(o.is_empty());
        // Sequence numbers keep growing after the queue empties.
        assert_eq!(o.push(started("c")), 6);
    }

    #[test]
    fn ephemeral_reports_keep_the_latest_per_key_and_never_enter_the_outbox() {
        let o = SharedOutbox::new();
        let progress = |done| {
            Body::PullProgress(berth_proto::v1::PullProgress {
                run_id: "r".to_string(),
                bytes_done: done,
                ..Default::default()
            })
        };
        o.push_ephemeral("run:r".to_string(), progress(1));
        o.push_ephemeral("run:r".to_string(), progress(2));
        o.push_ephemeral("run:s".to_string(), progress(3));
        assert!(o.is_empty(), "nothing to acknowledge");
        let sent = o.take_ephemeral();
        assert_eq!(sent.len(), 2);
        assert!(sent.iter().all(|m| m.seq == 0));
        assert!(matches!(&sent[0].body, Some(Body::PullProgress(p)) if p.bytes_done == 2));
        assert!(o.take_ephemeral().is_empty());
    }

    #[test]
    fn resend_after_reconnect_includes_everything_unacked() {
        let mut o = Outbox::new();
        o.push(started("a"));
        o.push(started("b"));
        o.push(started("c"));
        assert_eq!(o.unsent_after(2).len(), 1);
        o.ack(1);
        let resend: Vec<u64> = o.unsent_after(0).iter().map(|m| m.seq).collect();
        assert_eq!(resend, vec![2, 3]);
    }
}
