//! At-least-once delivery to the scheduler. Every report (RunStarted, RunExited, LogBatch) gets
//! the next `seq` and stays here until a cumulative `Ack.up_to_seq` covers it; after a reconnect
//! the whole remaining outbox is sent again.
//!
//! ## Bounded messages
//! gRPC refuses a message above its limit (4 MiB by default, the scheduler's too), and a refused
//! message re-sent unchanged is refused again, forever. So no queued message may come near it:
//! [`Outbox::push`] splits a `LogBatch` whose encoding is above [`MAX_MESSAGE_BYTES`] into
//! several (each its own `seq`), and cuts a single line that alone is too large (it cannot
//! happen with the agent's own lines, which are at most 64 KiB of output, but the bound must not
//! depend on it). And should the scheduler still keep refusing the oldest unacknowledged batch,
//! the session replaces its lines' text by a marker saying why ([`Outbox::defuse_front`]) rather
//! than re-sending it without end.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use berth_proto::v1::{agent_message::Body, AgentMessage, LogBatch, LogLine};
use prost::Message as _;
use tokio::sync::Notify;

/// The largest encoded `AgentMessage` the outbox queues: a quarter of gRPC's default 4 MiB limit,
/// so a message is never refused for its size and one message never holds the stream for long.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Room left in [`MAX_MESSAGE_BYTES`] for what wraps a batch: `AgentMessage.seq` and the body's
/// tag and length.
const ENVELOPE_BYTES: usize = 32;
/// Appended to a line cut to fit one message.
pub const CUT_MARKER: &str = " [berth] line cut: too long for one message";
/// How a line whose batch the scheduler kept refusing reads once defused.
pub const REFUSED_MARKER_PREFIX: &str = "[berth] line dropped: the scheduler refused it: ";

/// What `line` adds to an encoded `LogBatch`: its field tag, its length and itself.
fn line_bytes(line: &LogLine) -> usize {
    let len = line.encoded_len();
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn prefix_at_char(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Splits `batch` into batches whose encoding (as an `AgentMessage`) is at most `max_bytes`,
/// keeping the lines' order; a line that cannot fit even alone is cut, with [`CUT_MARKER`].
/// An empty batch stays one empty batch.
pub fn split_log_batch(batch: LogBatch, max_bytes: usize) -> Vec<LogBatch> {
    let budget = max_bytes.saturating_sub(ENVELOPE_BYTES);
    let empty = LogBatch {
        run_id: batch.run_id.clone(),
        lines: Vec::new(),
    };
    let base = empty.encoded_len();
    if base + ENVELOPE_BYTES + batch.lines.iter().map(line_bytes).sum::<usize>() <= max_bytes {
        return vec![batch];
    }
    let mut out = Vec::new();
    let mut current = empty.clone();
    let mut size = base;
    for mut line in batch.lines {
        let mut bytes = line_bytes(&line);
        if base + bytes > budget {
            // Alone too large: keep what fits (the other fields and the length prefix need
            // well under 64 bytes).
            let keep = budget.saturating_sub(base + 64 + CUT_MARKER.len());
            let mut msg = prefix_at_char(&line.msg, keep).to_owned();
            msg.push_str(CUT_MARKER);
            line.msg = msg;
            bytes = line_bytes(&line);
        }
        if !current.lines.is_empty() && size + bytes > budget {
            out.push(std::mem::replace(&mut current, empty.clone()));
            size = base;
        }
        size += bytes;
        current.lines.push(line);
    }
    if !current.lines.is_empty() || out.is_empty() {
        out.push(current);
    }
    out
}

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

    /// Queues `body` under the next sequence number and returns that number. A `LogBatch` too
    /// large for one message is queued as several ([`split_log_batch`]); the last one's number
    /// is returned.
    pub fn push(&mut self, body: Body) -> u64 {
        let bodies = match body {
            Body::LogBatch(batch) => split_log_batch(batch, MAX_MESSAGE_BYTES)
                .into_iter()
                .map(Body::LogBatch)
                .collect(),
            other => vec![other],
        };
        let mut seq = 0;
        for body in bodies {
            seq = self.next_seq.max(1);
            self.next_seq = seq + 1;
            self.entries.push_back(AgentMessage {
                seq,
                body: Some(body),
            });
        }
        seq
    }

    /// The oldest unacknowledged message's `seq`, if any.
    pub fn front_seq(&self) -> Option<u64> {
        self.entries.front().map(|m| m.seq)
    }

    /// Gives up delivering the oldest message as it is, when it is a `LogBatch` that the
    /// scheduler keeps refusing: its lines keep their numbers, but their text becomes a marker
    /// with `reason`, so the batch gets through (small) and the loss is visible in the run's
    /// logs. Returns whether it did; other reports are small and left as they are.
    pub fn defuse_front(&mut self, reason: &str) -> bool {
        let Some(Body::LogBatch(batch)) = self.entries.front_mut().and_then(|m| m.body.as_mut())
        else {
            return false;
        };
        let text = format!("{REFUSED_MARKER_PREFIX}{}", prefix_at_char(reason, 200));
        if batch.lines.iter().all(|l| l.msg == text) {
            return false;
        }
        for line in &mut batch.lines {
            line.msg = text.clone();
        }
        true
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

/// Sessions in a row that may fail with the same oldest message unacknowledged before that
/// message, if it is a `LogBatch`, is defused ([`Outbox::defuse_front`]).
pub const REFUSALS_BEFORE_DEFUSE: u32 = 3;

/// Watches whether the scheduler keeps refusing the oldest unacknowledged message: sessions that
/// registered and then failed without that message being acknowledged, in a row.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RefusalWatch {
    front: Option<u64>,
    failures: u32,
}

impl RefusalWatch {
    /// Records one registered session: the oldest unacknowledged `seq` when it began and when it
    /// ended, and whether it ended in an error. True when the message at the front has now been
    /// refused [`REFUSALS_BEFORE_DEFUSE`] times in a row (the count starts over).
    pub fn session_ended(
        &mut self,
        front_before: Option<u64>,
        front_after: Option<u64>,
        failed: bool,
    ) -> bool {
        let stuck = failed && front_after.is_some() && front_before == front_after;
        if !stuck {
            *self = Self::default();
            return false;
        }
        if self.front != front_after {
            self.front = front_after;
            self.failures = 0;
        }
        self.failures += 1;
        if self.failures >= REFUSALS_BEFORE_DEFUSE {
            self.failures = 0;
            return true;
        }
        false
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

    pub fn front_seq(&self) -> Option<u64> {
        self.lock().front_seq()
    }

    /// See [`Outbox::defuse_front`].
    pub fn defuse_front(&self, reason: &str) -> bool {
        self.lock().defuse_front(reason)
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
    use berth_proto::v1::RunStarted;

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

    fn line(seq: u64, msg: String) -> LogLine {
        LogLine {
            seq,
            stream: 1,
            msg,
            ts_unix_nanos: 1_700_000_000_000_000_000,
        }
    }

    fn encoded(batch: &LogBatch, seq: u64) -> usize {
        AgentMessage {
            seq,
            body: Some(Body::LogBatch(batch.clone())),
        }
        .encoded_len()
    }

    #[test]
    fn a_large_batch_is_queued_as_several_messages_within_the_bound() {
        let mut o = Outbox::new();
        // 100 lines of 64 KiB: 6.4 MiB in one batch, as the agent once sent it.
        let lines: Vec<LogLine> = (1..=100).map(|i| line(i, "a".repeat(65_536))).collect();
        let last = o.push(Body::LogBatch(LogBatch {
            run_id: "r".into(),
            lines,
        }));
        let queued = o.unsent_after(0);
        assert!(queued.len() >= 7, "{} messages", queued.len());
        assert_eq!(last, queued.len() as u64);
        let mut seqs = Vec::new();
        for m in &queued {
            assert!(m.encoded_len() <= MAX_MESSAGE_BYTES, "{}", m.encoded_len());
            let Some(Body::LogBatch(b)) = &m.body else {
                panic!("not a batch")
            };
            assert_eq!(b.run_id, "r");
            assert!(b.lines.iter().all(|l| l.msg.len() == 65_536));
            seqs.extend(b.lines.iter().map(|l| l.seq));
        }
        assert_eq!(
            seqs,
            (1..=100).collect::<Vec<u64>>(),
            "every line, in order"
        );
    }

    #[test]
    fn a_line_too_large_for_any_message_is_cut_with_a_marker_on_a_char_boundary() {
        let huge = "é".repeat(3 * 1024 * 1024); // 6 MiB of two-byte characters
        let parts = split_log_batch(
            LogBatch {
                run_id: "r".into(),
                lines: vec![
                    line(1, "short".into()),
                    line(2, huge),
                    line(3, "after".into()),
                ],
            },
            MAX_MESSAGE_BYTES,
        );
        let lines: Vec<&LogLine> = parts.iter().flat_map(|b| &b.lines).collect();
        assert_eq!(lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(lines[1].msg.ends_with(CUT_MARKER));
        assert!(lines[1].msg.len() > MAX_MESSAGE_BYTES / 2);
        for b in &parts {
            assert!(encoded(b, u64::MAX) <= MAX_MESSAGE_BYTES);
        }
    }

    #[test]
    fn small_and_empty_batches_stay_whole() {
        let small = LogBatch {
            run_id: "r".into(),
            lines: vec![line(1, "x".into())],
        };
        assert_eq!(
            split_log_batch(small.clone(), MAX_MESSAGE_BYTES),
            vec![small]
        );
        let empty = LogBatch {
            run_id: "r".into(),
            lines: vec![],
        };
        assert_eq!(
            split_log_batch(empty.clone(), MAX_MESSAGE_BYTES),
            vec![empty]
        );
    }

    proptest::proptest! {
        #[test]
        fn split_batches_fit_and_keep_every_line(
            sizes in proptest::collection::vec(0usize..40_000, 0..60),
            max in 2_000usize..200_000,
        ) {
            let lines: Vec<LogLine> = sizes
                .iter()
                .enumerate()
                .map(|(i, n)| line(i as u64 + 1, "ü".repeat(*n / 2)))
                .collect();
            let parts = split_log_batch(LogBatch { run_id: "run".into(), lines: lines.clone() }, max);
            let got: Vec<u64> = parts.iter().flat_map(|b| b.lines.iter().map(|l| l.seq)).collect();
            proptest::prop_assert_eq!(got, lines.iter().map(|l| l.seq).collect::<Vec<_>>());
            for b in &parts {
                proptest::prop_assert!(encoded(b, u64::MAX) <= max);
            }
            for (kept, orig) in parts.iter().flat_map(|b| &b.lines).zip(&lines) {
                proptest::prop_assert!(kept.msg == orig.msg || kept.msg.ends_with(CUT_MARKER));
            }
        }
    }

    #[test]
    fn a_refused_batch_is_defused_once_and_other_reports_are_not() {
        let mut o = Outbox::new();
        o.push(Body::LogBatch(LogBatch {
            run_id: "r".into(),
            lines: vec![line(7, "secret payload".into()), line(8, "more".into())],
        }));
        o.push(started("a"));
        assert!(o.defuse_front("message too large"));
        assert!(!o.defuse_front("message too large"), "already defused");
        let Some(Body::LogBatch(b)) = &o.unsent_after(0)[0].body else {
            panic!("not a batch")
        };
        assert_eq!(b.lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [7, 8]);
        assert!(b
            .lines
            .iter()
            .all(|l| l.msg == format!("{REFUSED_MARKER_PREFIX}message too large")));
        o.ack(1);
        assert!(!o.defuse_front("x"), "RunStarted is left alone");
    }

    #[test]
    fn only_sessions_failing_in_a_row_on_the_same_message_count_as_refusals() {
        let mut w = RefusalWatch::default();
        assert!(!w.session_ended(Some(4), Some(4), true));
        assert!(!w.session_ended(Some(4), Some(4), true));
        assert!(w.session_ended(Some(4), Some(4), true), "third refusal");
        assert!(
            !w.session_ended(Some(4), Some(4), true),
            "counts again from zero"
        );
        // Progress, a clean end or an empty outbox start over.
        let mut w = RefusalWatch::default();
        w.session_ended(Some(4), Some(4), true);
        w.session_ended(Some(4), Some(4), true);
        assert!(!w.session_ended(Some(4), Some(5), true));
        assert!(!w.session_ended(Some(5), Some(5), true));
        assert!(!w.session_ended(Some(5), Some(5), false));
        assert!(!w.session_ended(None, None, true));
        assert!(!w.session_ended(Some(5), Some(5), true));
        assert!(!w.session_ended(Some(5), Some(5), true));
        assert!(w.session_ended(Some(5), Some(5), true));
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
