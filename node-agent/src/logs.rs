//! Turns a run's captured stdout and stderr into numbered `LogLine`s and batches them into the
//! outbox.
//!
//! containerd's shim appends the container's output straight into two regular files in the
//! run's journal directory (see [`crate::journal`]); the [`LogPump`] tails them. Lines are split
//! on `\n` (the newline is stripped), lines longer than [`MAX_LINE_BYTES`] are split, bytes are
//! decoded lossily as UTF-8, and a final unterminated line is only taken when the run is over
//! (until then it may still grow). `seq` starts at 1 and grows across both streams in the order
//! the pump sees the lines.
//!
//! Every line is appended to the run's line log *before* it enters the outbox, together with
//! the raw-file offset right after it. So after an agent crash the new process continues with the
//! next `seq` at the right offsets — bytes the old process had read but not yet numbered (a
//! partial last line included) are simply read again — and re-sends the lines the scheduler has
//! not acknowledged: no line is lost, renumbered or duplicated.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::time::Duration;

use berth_proto::v1::{agent_message::Body, LogBatch, LogLine, LogStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::clock::unix_nanos_now;
use crate::journal::{JournalError, LineCursor, LineLog, LineRecord, RunDir};
use crate::outbox::SharedOutbox;

/// Longest line kept in one piece; longer lines are split into chunks of this size.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// A batch is sent once it holds this many lines...
pub const BATCH_MAX_LINES: usize = 256;
/// ...or this long after its first line arrived.
pub const BATCH_MAX_DELAY: Duration = Duration::from_millis(50);
/// How often the output files are checked for new bytes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Bytes read from an output file at a time.
const READ_CHUNK: usize = 256 * 1024;

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
pub fn split_lines(buf: &[u8], max_line: usize, at_eof: bool) -> Vec<SplitLine> {
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
            let end = pos + max_line;
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

/// The tail of one output file: what was numbered (`consumed`) and the bytes read past it.
struct StreamTail {
    stream: LogStream,
    path: PathBuf,
    file: Option<File>,
    consumed: u64,
    pending: Vec<u8>,
}

impl StreamTail {
    fn new(stream: LogStream, path: PathBuf, consumed: u64) -> Self {
        Self {
            stream,
            path,
            file: None,
            consumed,
            pending: Vec::new(),
        }
    }

    /// Reads what is new and numbers the complete lines (all of them with `at_eof`).
    fn poll(&mut self, at_eof: bool, next_seq: &mut u64, out: &mut Vec<LineRecord>) {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(error) => {
                    if error.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %self.path.display(), %error, "opening run output failed");
                    }
                    return;
                }
            }
        }
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            let Some(file) = self.file.as_ref() else {
                return;
            };
            let at = self.consumed + self.pending.len() as u64;
            let n = match file.read_at(&mut chunk, at) {
                Ok(n) => n,
                Err(error) => {
                    tracing::warn!(path = %self.path.display(), %error, "reading run output failed");
                    0
                }
            };
            self.pending.extend_from_slice(&chunk[..n]);
            let done = n == 0;
            self.take_lines(at_eof && done, next_seq, out);
            if done {
                return;
            }
        }
    }

    fn take_lines(&mut self, at_eof: bool, next_seq: &mut u64, out: &mut Vec<LineRecord>) {
        let lines = split_lines(&self.pending, MAX_LINE_BYTES, at_eof);
        let Some(last) = lines.last() else {
            return;
        };
        let ts = unix_nanos_now();
        let taken = last.next;
        for line in &lines {
            out.push(LineRecord {
                seq: *next_seq,
                stream: self.stream as i32,
                next: self.consumed + line.next as u64,
                ts,
                msg: String::from_utf8_lossy(&self.pending[line.start..line.end]).into_owned(),
            });
            *next_seq += 1;
        }
        self.pending.drain(..taken);
        self.consumed += taken as u64;
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
    pub fn start(
        run_id: String,
        run_dir: &RunDir,
        acked: u64,
        outbox: SharedOutbox,
    ) -> Result<Self, JournalError> {
        let (line_log, records, cursor) = LineLog::open(&run_dir.lines())?;
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
            ),
            StreamTail::new(
                LogStream::Stderr,
                run_dir.stderr(),
                cursor.offset(LogStream::Stderr),
            ),
        ];
        let task = tokio::spawn(tail(run_id, tails, cursor, line_log, finish_rx, outbox));
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
    mut line_log: LineLog,
    mut finish: watch::Receiver<bool>,
    outbox: SharedOutbox,
) {
    let mut next_seq = cursor.next_seq;
    let mut batch: Vec<LogLine> = Vec::new();
    let mut batch_since: Option<Instant> = None;
    let flush = |batch: &mut Vec<LogLine>| {
        if !batch.is_empty() {
            outbox.push(Body::LogBatch(LogBatch {
                run_id: run_id.clone(),
                lines: std::mem::take(batch),
            }));
        }
    };
    loop {
        let finishing = tokio::select! {
            // An error means the pump was dropped: finish as well.
            _ = finish.wait_for(|f| *f) => true,
            _ = tokio::time::sleep(POLL_INTERVAL) => false,
        };
        let mut found = Vec::new();
        for stream in &mut tails {
            stream.poll(finishing, &mut next_seq, &mut found);
        }
        if !found.is_empty() {
            // Durable first: a line reaches the outbox only once a restart would number it the
            // same way.
            if let Err(error) = line_log.append(&found) {
                tracing::error!(run_id = %run_id, %error, "persisting log lines failed; a crash now could lose them");
            }
            for record in found {
                if batch.is_empty() {
                    batch_since = Some(Instant::now());
                }
                batch.push(to_log_line(record));
                if batch.len() >= BATCH_MAX_LINES {
                    flush(&mut batch);
                }
            }
        }
        let due = batch_since.is_some_and(|t| t.elapsed() >= BATCH_MAX_DELAY);
        if finishing || due {
            flush(&mut batch);
            batch_since = None;
        }
        if finishing {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Journal, RunRecord};
    use std::io::Write as _;

    fn texts(buf: &[u8], max: usize, at_eof: bool) -> Vec<&[u8]> {
        split_lines(buf, max, at_eof)
            .into_iter()
            .map(|l| &buf[l.start..l.end])
            .collect()
    }

    #[test]
    fn splits_complete_lines_and_keeps_the_tail_until_eof() {
        let buf = b"hello\nworld\n\nlast";
        assert_eq!(texts(buf, 1024, false), vec![&b"hello"[..], b"world", b""]);
        assert_eq!(
            split_lines(buf, 1024, false).last().map(|l| l.next),
            Some(13)
        );
        assert_eq!(
            texts(buf, 1024, true),
            vec![&b"hello"[..], b"world", b"", b"last"]
        );
    }

    #[test]
    fn long_lines_are_split_at_the_limit() {
        assert_eq!(
            texts(b"abcdefgh\nxy", 3, true),
            vec![&b"abc"[..], b"def", b"gh", b"xy"]
        );
        // Exactly the limit followed by a newline is one line, not two.
        assert_eq!(texts(b"abc\nd", 3, true), vec![&b"abc"[..], b"d"]);
        // A cut at the limit waits until the next byte says whether a newline follows.
        assert!(texts(b"abc", 3, false).is_empty());
        let lines = split_lines(b"abc\n", 3, false);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].next, 4);
    }

    fn journal_dir(state: &std::path::Path) -> RunDir {
        Journal::new(state)
            .create(&RunRecord {
                run_id: "r1".to_string(),
                lease_epoch: 1,
                spec: Default::default(),
                image_digest: String::new(),
                started_at_unix_nanos: Some(1),
            })
            .expect("journal")
    }

    fn append(path: PathBuf, bytes: &[u8]) {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .expect("open")
            .write_all(bytes)
            .expect("write");
    }

    fn lines_of(outbox: &SharedOutbox) -> Vec<(u64, i32, String)> {
        outbox
            .snapshot()
            .into_iter()
            .filter_map(|m| match m.body {
                Some(Body::LogBatch(b)) => Some(b.lines),
                _ => None,
            })
            .flatten()
            .map(|l| (l.seq, l.stream, l.msg))
            .collect()
    }

    #[tokio::test]
    async fn pump_numbers_lines_across_streams_and_keeps_them_apart() {
        let state = tempfile::tempdir().expect("tempdir");
        let dir = journal_dir(state.path());
        let outbox = SharedOutbox::new();
        let mut pump = LogPump::start("r1".into(), &dir, 0, outbox.clone()).expect("pump");
        append(dir.stdout(), b"one\n");
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        append(dir.stderr(), b"two\xff\n");
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        append(dir.stdout(), b"three");
        pump.finish().await;
        assert_eq!(
            lines_of(&outbox),
            vec![
                (1, LogStream::Stdout as i32, "one".to_string()),
                (2, LogStream::Stderr as i32, "two\u{fffd}".to_string()),
                (3, LogStream::Stdout as i32, "three".to_string()),
            ]
        );
    }

    #[tokio::test]
    async fn batches_cap_at_256_lines() {
        let state = tempfile::tempdir().expect("tempdir");
        let dir = journal_dir(state.path());
        let outbox = SharedOutbox::new();
        let mut pump = LogPump::start("r1".into(), &dir, 0, outbox.clone()).expect("pump");
        let text: String = (0..600).map(|i| format!("{i}\n")).collect();
        append(dir.stdout(), text.as_bytes());
        pump.finish().await;
        let sizes: Vec<usize> = outbox
            .snapshot()
            .into_iter()
            .filter_map(|m| match m.body {
                Some(Body::LogBatch(b)) => Some(b.lines.len()),
                _ => None,
            })
            .collect();
        assert!(sizes.iter().all(|n| *n <= BATCH_MAX_LINES), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 600);
    }

    /// An agent process dies (the pump is dropped without finishing) with a partial line read;
    /// the next process re-sends what was not acknowledged and continues with the next seq,
    /// completing the partial line, with nothing lost or duplicated.
    #[tokio::test]
    async fn a_new_pump_resumes_after_a_crash_without_loss_or_duplicates() {
        let state = tempfile::tempdir().expect("tempdir");
        let dir = journal_dir(state.path());
        let first = SharedOutbox::new();
        let pump = LogPump::start("r1".into(), &dir, 0, first.clone()).expect("pump");
        append(dir.stdout(), b"out1\nout2\nou");
        append(dir.stderr(), b"err1\n");
        for _ in 0..100 {
            if lines_of(&first).len() == 3 {
                break;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        drop(pump); // kill -9
        let before = lines_of(&first);
        assert_eq!(before.len(), 3, "{before:?}");
        // The scheduler acknowledged the first line only.
        append(dir.stdout(), b"t3\n");
        append(dir.stderr(), b"err2");

        let second = SharedOutbox::new();
        let mut pump = LogPump::start("r1".into(), &dir, 1, second.clone()).expect("pump");
        pump.finish().await;
        let after = lines_of(&second);
        assert_eq!(
            &after[..2],
            &before[1..],
            "unacknowledged lines re-sent as they were"
        );
        let mut all: Vec<(u64, i32, String)> = before[..1].to_vec();
        all.extend(after);
        let seqs: Vec<u64> = all.iter().map(|l| l.0).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
        let stream = |s: LogStream| -> Vec<&str> {
            all.iter()
                .filter(|l| l.1 == s as i32)
                .map(|l| l.2.as_str())
                .collect()
        };
        assert_eq!(stream(LogStream::Stdout), vec!["out1", "out2", "out3"]);
        assert_eq!(stream(LogStream::Stderr), vec!["err1", "err2"]);
    }
}
