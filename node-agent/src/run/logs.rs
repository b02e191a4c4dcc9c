//! Turns a run's captured stdout and stderr into numbered `LogLine`s and batches them into the
//! outbox.
//!
//! containerd's shim appends the container's output straight into two regular files in the
//! run's journal directory (see [`crate::run::journal`]); the [`LogPump`] tails them. Lines are split
//! on `\n` (the newline is stripped), lines longer than [`MAX_LINE_BYTES`] are split into pieces
//! of at most that size (cut before a UTF-8 character that would straddle the cut), bytes are
//! decoded lossily as UTF-8 (an invalid byte becomes U+FFFD, so binary output is kept as text of
//! at most three times its size), and a final unterminated line is only taken when the run is
//! over (until then it may still grow). `seq` starts at 1 and grows across both streams in the order
//! the pump sees the lines.
//!
//! Every line is appended to the run's line log *before* it enters the outbox, together with
//! the raw-file offset right after it. So after an agent crash the new process continues with the
//! next `seq` at the right offsets — bytes the old process had read but not yet numbered (a
//! partial last line included) are simply read again — and re-sends the lines the scheduler has
//! not acknowledged: no line is lost, renumbered or duplicated.
//!
//! ## Message size
//! What one poll finds goes to the outbox at the end of that poll (no batching delay: a line
//! waits at most one [`POLL_INTERVAL`] on the node), in batches of at most [`BATCH_MAX_LINES`]
//! lines and about [`MAX_MESSAGE_BYTES`] encoded — large batches, because the scheduler handles
//! a node's messages one after the other and stores each batch in one commit, so a run writing
//! fast is stored in few commits. The outbox splits whatever is larger, lines re-sent from
//! the line log after a restart included (an older agent queued them 256 at a time whatever
//! their size, which could exceed gRPC's 4 MiB and wedge the node). A line is at most
//! [`MAX_LINE_BYTES`] of output, at most three times that as text: far below one message.
//!
//! ## Volume limits and disk use
//! A run's logging is capped by [`LogLimits`] (bytes and lines per run; a line costs its text
//! plus one byte for its line break). The first line that does not fit ends the run's logging:
//! it and all later output are dropped, and one marker line on stderr says so
//! ([`LogBudget::marker`]). The run keeps running; from then on the pump only skips to the end of
//! the output files, so the run is never blocked and its output costs nothing. The budget is
//! rebuilt from the line log after a restart, so a re-adopted run stays capped.
//!
//! The raw output files only grow at their logical end: once a stretch is numbered and in the
//! line log (or dropped), the pump punches it out of the file (`FALLOC_FL_PUNCH_HOLE`), so the
//! disk holds only output not yet read, whatever the run writes. Offsets stay valid because
//! punching keeps the file's size.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::v1::{agent_message::Body, LogBatch, LogLine, LogStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::unix_nanos_now;
use crate::outbox::{SharedOutbox, MAX_MESSAGE_BYTES};
use crate::run::journal::{JournalError, LineCursor, LineLog, LineRecord, RunDir};

/// Longest line kept in one piece; longer lines are split into pieces of this size. 64 KiB keeps
/// a piece (at most 192 KiB as text, for binary output) a small part of one message, and the
/// pieces of a long line (minified JSON, a base64 blob) still join back to the whole.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// The most lines in one batch (lines of ~100 bytes fill [`MAX_MESSAGE_BYTES`] at about 8,000).
pub const BATCH_MAX_LINES: usize = 16_384;
/// How often the output files are checked for new bytes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Bytes read from an output file at a time.
const READ_CHUNK: usize = 256 * 1024;
/// Most bytes read from one output file per poll while the run is still going, so a run that
/// writes faster than lines can be numbered cannot keep the pump in one poll forever.
const READ_BUDGET_PER_POLL: u64 = 8 * 1024 * 1024;
/// Consumed output is punched out of the raw files in steps of at least this many bytes.
const PUNCH_MIN_BYTES: u64 = 1024 * 1024;
/// Default of `--max-log-bytes-per-run`.
pub const DEFAULT_MAX_LOG_BYTES_PER_RUN: u64 = 16 * 1024 * 1024;
/// Default of `--max-log-lines-per-run`.
pub const DEFAULT_MAX_LOG_LINES_PER_RUN: u64 = 100_000;
/// How every "log limit reached" marker line starts.
pub const LIMIT_MARKER_PREFIX: &str = "[berth] log limit of ";

/// How much of one run's output becomes log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Bytes of line text, each line counted with one extra byte for its line break.
    pub max_bytes: u64,
    pub max_lines: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_LOG_BYTES_PER_RUN,
            max_lines: DEFAULT_MAX_LOG_LINES_PER_RUN,
        }
    }
}

/// Which of the [`LogLimits`] a run reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitReached {
    Bytes,
    Lines,
}

/// What a run has logged so far against its [`LogLimits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBudget {
    limits: LogLimits,
    bytes: u64,
    lines: u64,
    reached: Option<LimitReached>,
    /// The marker line has been numbered (it is in the line log).
    marked: bool,
}

impl LogBudget {
    pub fn new(limits: LogLimits) -> Self {
        Self {
            limits,
            bytes: 0,
            lines: 0,
            reached: None,
            marked: false,
        }
    }

    /// The budget as the line log left it: its lines charged, and exhausted if it holds the
    /// marker.
    pub fn from_records(limits: LogLimits, records: &[LineRecord]) -> Self {
        let mut budget = Self::new(limits);
        for record in records {
            if record.marker {
                budget.marked = true;
                budget.reached.get_or_insert(LimitReached::Bytes);
            } else {
                budget.bytes = budget.bytes.saturating_add(line_cost(&record.msg));
                budget.lines = budget.lines.saturating_add(1);
            }
        }
        budget
    }

    /// Charges a line of text `msg` if it fits. The first line that does not fit exhausts the
    /// budget for good: it and every later line are refused.
    pub fn admit(&mut self, msg: &str) -> bool {
        if self.reached.is_some() {
            return false;
        }
        let cost = line_cost(msg);
        if self.lines.saturating_add(1) > self.limits.max_lines {
            self.reached = Some(LimitReached::Lines);
            return false;
        }
        if self.bytes.saturating_add(cost) > self.limits.max_bytes {
            self.reached = Some(LimitReached::Bytes);
            return false;
        }
        self.bytes += cost;
        self.lines += 1;
        true
    }

    pub fn exhausted(&self) -> bool {
        self.reached.is_some()
    }

    /// Bytes charged so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The marker line's text, the first time it is asked for after the budget ran out.
    pub fn take_marker(&mut self) -> Option<String> {
        if self.marked {
            return None;
        }
        let text = self.marker()?;
        self.marked = true;
        Some(text)
    }

    /// The text of the marker line for the limit that was reached, if one was.
    pub fn marker(&self) -> Option<String> {
        Some(match self.reached? {
            LimitReached::Bytes => format!(
                "{LIMIT_MARKER_PREFIX}{} bytes reached; further output dropped",
                self.limits.max_bytes
            ),
            LimitReached::Lines => format!(
                "{LIMIT_MARKER_PREFIX}{} lines reached; further output dropped",
                self.limits.max_lines
            ),
        })
    }
}

/// What a line counts against [`LogLimits::max_bytes`]: its text and its line break.
fn line_cost(msg: &str) -> u64 {
    msg.len() as u64 + 1
}

/// One line found in a buffer: its text and where the next line starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitLine {
    pub start: usize,
    pub end: usize,
    /// Offset right after the line and its newline, if it had one.
    pub next: usize,
}

/// Splits the complete lines off the front of `buf`. A line is complete when its newline is
/// there, when it reached `max_line` bytes (the newline right after such a cut belongs to it, so
/// the cut waits until that byte is known), or, with `at_eof`, when the data ends.
/// A cut never splits one of `keep_whole` (see [`whole`]).
pub fn split_lines(
    buf: &[u8],
    max_line: usize,
    at_eof: bool,
    keep_whole: &[whole::Whole],
) -> Vec<SplitLine> {
    let max_line = max_line.max(1);
    let mut lines = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let rest = &buf[pos..];
        let window = &rest[..rest.len().min(max_line)];
        if let Some(i) = window.iter().position(|b| *b == b'\n') {
            lines.push(SplitLine {
                start: pos,
                end: pos + i,
                next: pos + i + 1,
            });
            pos += i + 1;
        } else if rest.len() > max_line {
            let end = char_cut(buf, pos, pos + max_line);
            let end = whole::cut_before(buf, pos, end, keep_whole);
            let next = if buf[end] == b'\n' { end + 1 } else { end };
            lines.push(SplitLine {
                start: pos,
                end,
                next,
            });
            pos = next;
        } else if at_eof {
            lines.push(SplitLine {
                start: pos,
                end: buf.len(),
                next: buf.len(),
            });
            pos = buf.len();
        } else {
            break;
        }
    }
    lines
}

/// Where to cut a line that is too long at `end`: there, or a little before when `end` falls
/// inside a well-formed UTF-8 character, so the character stays whole in the next piece instead
/// of becoming two replacement characters. Never at or before `start`.
fn char_cut(buf: &[u8], start: usize, end: usize) -> usize {
    let is_continuation = |b: u8| b & 0b1100_0000 == 0b1000_0000;
    let mut lead = end;
    while lead > start && end - lead < 3 && is_continuation(buf[lead]) {
        lead -= 1;
    }
    if lead == end || lead == start {
        return end;
    }
    let width = match buf[lead] {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return end,
    };
    let char_end = lead + width;
    // A character the buffer holds only the start of (the rest not yet read) counts as whole.
    let whole = match buf.get(lead..char_end) {
        Some(bytes) => std::str::from_utf8(bytes).is_ok(),
        None => buf[lead + 1..].iter().all(|b| is_continuation(*b)),
    };
    if whole && char_end > end {
        lead
    } else {
        end
    }
}

/// The tail of one output file: what was numbered (`consumed`) and the bytes read past it.
struct StreamTail {
    stream: LogStream,
    path: PathBuf,
    file: Option<File>,
    /// The file is open for writing too, so consumed output can be punched out of it.
    punchable: bool,
    consumed: u64,
    /// Everything before this offset has been punched out (or never needs to be).
    punched: u64,
    pending: Vec<u8>,
    /// Values a cut never splits (the run's environment values, see [`whole`]).
    keep_whole: Arc<[whole::Whole]>,
}

impl StreamTail {
    fn new(
        stream: LogStream,
        path: PathBuf,
        consumed: u64,
        keep_whole: Arc<[whole::Whole]>,
    ) -> Self {
        Self {
            stream,
            path,
            file: None,
            punchable: false,
            consumed,
            punched: 0,
            pending: Vec::new(),
            keep_whole,
        }
    }

    fn open(&mut self) -> bool {
        if self.file.is_some() {
            return true;
        }
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map(|file| (file, true))
            .or_else(|_| File::open(&self.path).map(|file| (file, false)));
        match opened {
            Ok((file, punchable)) => {
                self.file = Some(file);
                self.punchable = punchable;
                true
            }
            Err(error) => {
                if error.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.path.display(), %error, "opening run output failed");
                }
                false
            }
        }
    }

    /// Reads what is new and numbers the complete lines the budget admits (all of them with
    /// `at_eof`). Returns true when it stopped at the per-poll read budget with more to read.
    fn poll(
        &mut self,
        at_eof: bool,
        next_seq: &mut u64,
        budget: &mut LogBudget,
        out: &mut Vec<LineRecord>,
    ) -> bool {
        if !self.open() {
            return false;
        }
        if budget.exhausted() {
            self.skip_to_end();
            return false;
        }
        let mut chunk = vec![0u8; READ_CHUNK];
        let mut read: u64 = 0;
        loop {
            if !at_eof && read >= READ_BUDGET_PER_POLL {
                return true;
            }
            let Some(file) = self.file.as_ref() else {
                return false;
            };
            let at = self.consumed + self.pending.len() as u64;
            let n = match file.read_at(&mut chunk, at) {
                Ok(n) => n,
                Err(error) => {
                    tracing::warn!(path = %self.path.display(), %error, "reading run output failed");
                    0
                }
            };
            read += n as u64;
            self.pending.extend_from_slice(&chunk[..n]);
            let done = n == 0;
            self.take_lines(at_eof && done, next_seq, budget, out);
            if budget.exhausted() {
                self.skip_to_end();
                return false;
            }
            if done {
                return false;
            }
        }
    }

    fn take_lines(
        &mut self,
        at_eof: bool,
        next_seq: &mut u64,
        budget: &mut LogBudget,
        out: &mut Vec<LineRecord>,
    ) {
        let lines = split_lines(&self.pending, MAX_LINE_BYTES, at_eof, &self.keep_whole);
        let ts = unix_nanos_now();
        let mut taken = 0;
        for line in &lines {
            let msg = String::from_utf8_lossy(&self.pending[line.start..line.end]).into_owned();
            if !budget.admit(&msg) {
                break;
            }
            out.push(LineRecord {
                seq: *next_seq,
                stream: self.stream as i32,
                next: self.consumed + line.next as u64,
                ts,
                msg,
                marker: false,
            });
            *next_seq += 1;
            taken = line.next;
        }
        self.pending.drain(..taken);
        self.consumed += taken as u64;
    }

    /// Past the log limit: forget whatever is buffered and everything written so far (counted
    /// as dropped bytes; not read, so not counted in lines).
    fn skip_to_end(&mut self) {
        self.pending.clear();
        let len = self
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.len())
            .unwrap_or(self.consumed);
        crate::metrics::log_dropped(len.saturating_sub(self.consumed));
        self.consumed = self.consumed.max(len);
    }

    /// Frees the disk space of output that is numbered and persisted (or dropped). With
    /// `all`, however little it is.
    fn punch_consumed(&mut self, all: bool) {
        let Some(file) = self.file.as_ref().filter(|_| self.punchable) else {
            return;
        };
        let len = self.consumed.saturating_sub(self.punched);
        if len == 0 || (!all && len < PUNCH_MIN_BYTES) {
            return;
        }
        let (Ok(offset), Ok(length)) = (i64::try_from(self.punched), i64::try_from(len)) else {
            return;
        };
        let mode = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match nix::fcntl::fallocate(file.as_raw_fd(), mode, offset, length) {
            Ok(()) => self.punched = self.consumed,
            Err(errno) => {
                tracing::warn!(path = %self.path.display(), %errno, "cannot free consumed run output; the file keeps its size on disk");
                self.punchable = false;
            }
        }
    }
}

/// The task that tails one run's output.
pub struct LogPump {
    finish: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl LogPump {
    /// Opens the run's line log, queues the lines it holds above `acked` (numbered by an earlier
    /// agent process and perhaps never delivered), and starts tailing the output files from
    /// where that log ends.
    /// `limits` cap what the run may log in all (the lines already in the log included).
    /// A long line is never cut through one of `env_values` (so a secret reaches the scheduler
    /// whole, where it is redacted).
    pub fn start<'a>(
        run_id: String,
        run_dir: &RunDir,
        acked: u64,
        limits: LogLimits,
        env_values: impl IntoIterator<Item = &'a str>,
        outbox: SharedOutbox,
    ) -> Result<Self, JournalError> {
        let keep_whole: Arc<[whole::Whole]> = whole::from_values(env_values).into();
        let (line_log, records, cursor) = LineLog::open(&run_dir.lines())?;
        let budget = LogBudget::from_records(limits, &records);
        let unacked: Vec<LogLine> = records
            .into_iter()
            .filter(|r| r.seq > acked)
            .map(to_log_line)
            .collect();
        if !unacked.is_empty() {
            tracing::info!(run_id = %run_id, lines = unacked.len(), "re-sending log lines not yet acknowledged");
        }
        for chunk in unacked.chunks(BATCH_MAX_LINES) {
            outbox.push(Body::LogBatch(LogBatch {
                run_id: run_id.clone(),
                lines: chunk.to_vec(),
            }));
        }
        let (finish, finish_rx) = watch::channel(false);
        let tails = [
            StreamTail::new(
                LogStream::Stdout,
                run_dir.stdout(),
                cursor.offset(LogStream::Stdout),
                keep_whole.clone(),
            ),
            StreamTail::new(
                LogStream::Stderr,
                run_dir.stderr(),
                cursor.offset(LogStream::Stderr),
                keep_whole,
            ),
        ];
        let task = tokio::spawn(tail(
            run_id, tails, cursor, budget, line_log, finish_rx, outbox,
        ));
        Ok(Self {
            finish,
            task: Some(task),
        })
    }

    /// Takes everything that is in the output files now — a final unterminated line included —
    /// queues it, and stops. Call once the output is complete (the task was deleted).
    pub async fn finish(&mut self) {
        self.finish.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for LogPump {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn to_log_line(record: LineRecord) -> LogLine {
    LogLine {
        seq: record.seq,
        stream: record.stream,
        msg: record.msg,
        ts_unix_nanos: record.ts,
    }
}

async fn tail(
    run_id: String,
    mut tails: [StreamTail; 2],
    cursor: LineCursor,
    mut budget: LogBudget,
    mut line_log: LineLog,
    mut finish: watch::Receiver<bool>,
    outbox: SharedOutbox,
) {
    let mut next_seq = cursor.next_seq;
    let mut batch: Vec<LogLine> = Vec::new();
    let mut batch_bytes = 0usize;
    let flush = |batch: &mut Vec<LogLine>, batch_bytes: &mut usize| {
        *batch_bytes = 0;
        if !batch.is_empty() {
            outbox.push(Body::LogBatch(LogBatch {
                run_id: run_id.clone(),
                lines: std::mem::take(batch),
            }));
        }
    };
    let mut behind = false;
    loop {
        let finishing = if behind {
            // More output is waiting: read on at once, but let other tasks run first.
            tokio::task::yield_now().await;
            *finish.borrow()
        } else {
            tokio::select! {
                // An error means the pump was dropped: finish as well.
                _ = finish.wait_for(|f| *f) => true,
                _ = tokio::time::sleep(POLL_INTERVAL) => false,
            }
        };
        let mut found = Vec::new();
        behind = false;
        for stream in &mut tails {
            behind |= stream.poll(finishing, &mut next_seq, &mut budget, &mut found);
        }
        crate::metrics::log_lines(
            found.len() as u64,
            found.iter().map(|r| r.msg.len() as u64).sum(),
        );
        if let Some(text) = budget.take_marker() {
            crate::metrics::log_limit_reached();
            tracing::warn!(run_id = %run_id, logged_bytes = budget.bytes(), "run reached its log limit; dropping further output");
            let [_, stderr] = &tails;
            found.push(LineRecord {
                seq: next_seq,
                stream: LogStream::Stderr as i32,
                next: stderr.consumed,
                ts: unix_nanos_now(),
                msg: text,
                marker: true,
            });
            next_seq += 1;
        }
        // Durable first: a line reaches the outbox only once a restart would number it the
        // same way.
        let persisted = match line_log.append(&found) {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(run_id = %run_id, %error, "persisting log lines failed; a crash now could lose them");
                false
            }
        };
        if persisted {
            for stream in &mut tails {
                stream.punch_consumed(finishing);
            }
        }
        for record in found {
            batch_bytes += record.msg.len();
            batch.push(to_log_line(record));
            if batch.len() >= BATCH_MAX_LINES || batch_bytes >= MAX_MESSAGE_BYTES {
                flush(&mut batch, &mut batch_bytes);
            }
        }
        flush(&mut batch, &mut batch_bytes);
        if finishing {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
pub mod whole;
