//! Turns a run's stdout and stderr byte streams into numbered `LogLine`s and batches them into the
//! outbox. Lines are split on `\n` (the newline is stripped), lines longer than
//! [`MAX_LINE_BYTES`] are split, bytes are decoded lossily as UTF-8, and a final unterminated line
//! is flushed at EOF. `seq` starts at 1 and grows across both streams in arrival order.

use std::time::Duration;

use berth_proto::v1::{agent_message::Body, LogBatch, LogLine, LogStream};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::clock::unix_nanos_now;
use crate::outbox::SharedOutbox;

/// Longest line kept in one piece; longer lines are split into chunks of this size.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// A batch is sent once it holds this many lines...
pub const BATCH_MAX_LINES: usize = 256;
/// ...or this long after its first line arrived.
pub const BATCH_MAX_DELAY: Duration = Duration::from_millis(50);

/// Splits a byte stream into lines.
#[derive(Debug)]
pub struct LineSplitter {
    pending: Vec<u8>,
    max_line: usize,
}

impl LineSplitter {
    pub fn new(max_line: usize) -> Self {
        Self {
            pending: Vec::new(),
            max_line: max_line.max(1),
        }
    }

    /// Feeds `data`, appending every completed line (without its newline) to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<Vec<u8>>) {
        while !data.is_empty() {
            let room = self.max_line - self.pending.len();
            let window = &data[..data.len().min(room)];
            match window.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    self.pending.extend_from_slice(&window[..i]);
                    out.push(std::mem::take(&mut self.pending));
                    data = &data[i + 1..];
                }
                None => {
                    self.pending.extend_from_slice(window);
                    data = &data[window.len()..];
                    if self.pending.len() >= self.max_line {
                        // An over-long line: emit what we have as one piece. A newline right
                        // after the cut would otherwise produce an extra empty line.
                        out.push(std::mem::take(&mut self.pending));
                        if data.first() == Some(&b'\n') {
                            data = &data[1..];
                        }
                    }
                }
            }
        }
    }

    /// The final unterminated line, if any.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        if self.pending.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.pending))
        }
    }
}

struct RawLine {
    stream: LogStream,
    bytes: Vec<u8>,
    ts_unix_nanos: i64,
}

/// The reader and batcher tasks of one run's logs.
pub struct LogPump {
    readers: Vec<JoinHandle<()>>,
    batcher: Option<JoinHandle<u64>>,
}

impl LogPump {
    /// Starts reading both streams; batches go into `outbox` as `LogBatch` for `run_id`.
    pub fn start<O, E>(run_id: String, stdout: O, stderr: E, outbox: SharedOutbox) -> Self
    where
        O: AsyncRead + Send + Unpin + 'static,
        E: AsyncRead + Send + Unpin + 'static,
    {
        let (tx, rx) = mpsc::channel::<RawLine>(1024);
        let readers = vec![
            tokio::spawn(read_stream(stdout, LogStream::Stdout, tx.clone())),
            tokio::spawn(read_stream(stderr, LogStream::Stderr, tx)),
        ];
        let batcher = tokio::spawn(batch_lines(run_id, rx, outbox));
        Self {
            readers,
            batcher: Some(batcher),
        }
    }

    /// Waits up to `limit` for both streams to reach EOF and every line to be queued. Returns
    /// true when done.
    pub async fn wait_for_eof(&mut self, limit: Duration) -> bool {
        let Some(batcher) = self.batcher.as_mut() else {
            return true;
        };
        match tokio::time::timeout(limit, batcher).await {
            Ok(_) => {
                self.batcher = None;
                true
            }
            Err(_) => false,
        }
    }

    /// Stops reading (what was read so far is still flushed) and waits for the last batch.
    pub async fn stop_and_flush(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
        if let Some(batcher) = self.batcher.take() {
            // Aborted readers drop their senders, so the batcher flushes and returns promptly.
            let _ = batcher.await;
        }
    }
}

impl Drop for LogPump {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.abort();
        }
    }
}

async fn read_stream<R: AsyncRead + Unpin>(
    mut reader: R,
    stream: LogStream,
    tx: mpsc::Sender<RawLine>,
) {
    let mut splitter = LineSplitter::new(MAX_LINE_BYTES);
    let mut buf = vec![0u8; 32 * 1024];
    let mut lines = Vec::new();
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) => {
                tracing::warn!(?stream, %error, "reading container output failed");
                break;
            }
        };
        splitter.push(&buf[..n], &mut lines);
        let ts = unix_nanos_now();
        for bytes in lines.drain(..) {
            if tx
                .send(RawLine {
                    stream,
                    bytes,
                    ts_unix_nanos: ts,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }
    if let Some(bytes) = splitter.finish() {
        let _ = tx
            .send(RawLine {
                stream,
                bytes,
                ts_unix_nanos: unix_nanos_now(),
            })
            .await;
    }
}

async fn batch_lines(run_id: String, mut rx: mpsc::Receiver<RawLine>, outbox: SharedOutbox) -> u64 {
    let mut next_seq: u64 = 1;
    let mut batch: Vec<LogLine> = Vec::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    let flush = |batch: &mut Vec<LogLine>| {
        if !batch.is_empty() {
            outbox.push(Body::LogBatch(LogBatch {
                run_id: run_id.clone(),
                lines: std::mem::take(batch),
            }));
        }
    };
    loop {
        let received = match deadline {
            Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
                Ok(line) => line,
                Err(_) => {
                    flush(&mut batch);
                    deadline = None;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(raw) = received else {
            flush(&mut batch);
            return next_seq - 1;
        };
        batch.push(LogLine {
            seq: next_seq,
            stream: raw.stream as i32,
            msg: String::from_utf8_lossy(&raw.bytes).into_owned(),
            ts_unix_nanos: raw.ts_unix_nanos,
        });
        next_seq += 1;
        if deadline.is_none() {
            deadline = Some(tokio::time::Instant::now() + BATCH_MAX_DELAY);
        }
        if batch.len() >= BATCH_MAX_LINES {
            flush(&mut batch);
            deadline = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn split(chunks: &[&[u8]], max: usize) -> Vec<Vec<u8>> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn splits_across_chunks_and_flushes_tail() {
        let out = split(&[b"he", b"llo\nwor", b"ld\n\nlast"], 1024);
        assert_eq!(
            out,
            vec![
                b"hello".to_vec(),
                b"world".to_vec(),
                b"".to_vec(),
                b"last".to_vec()
            ]
        );
    }

    #[test]
    fn long_lines_are_split_at_the_limit() {
        let out = split(&[b"abcdefgh\nxy"], 3);
        assert_eq!(
            out,
            vec![
                b"abc".to_vec(),
                b"def".to_vec(),
                b"gh".to_vec(),
                b"xy".to_vec()
            ]
        );
        // Exactly the limit followed by a newline is one line, not two.
        assert_eq!(split(&[b"abc\nd"], 3), vec![b"abc".to_vec(), b"d".to_vec()]);
    }

    #[tokio::test]
    async fn pump_numbers_lines_across_streams_and_keeps_them_apart() {
        let outbox = SharedOutbox::new();
        let (mut out_w, out_r) = tokio::io::duplex(1024);
        let (mut err_w, err_r) = tokio::io::duplex(1024);
        let mut pump = LogPump::start("r1".into(), out_r, err_r, outbox.clone());
        out_w.write_all(b"one\n").await.expect("write");
        tokio::time::sleep(Duration::from_millis(5)).await;
        err_w.write_all(b"two\xff\n").await.expect("write");
        tokio::time::sleep(Duration::from_millis(5)).await;
        out_w.write_all(b"three").await.expect("write");
        drop(out_w);
        drop(err_w);
        assert!(pump.wait_for_eof(Duration::from_secs(2)).await);
        let lines: Vec<LogLine> = outbox
            .snapshot()
            .into_iter()
            .filter_map(|m| match m.body {
                Some(Body::LogBatch(b)) => Some(b.lines),
                _ => None,
            })
            .flatten()
            .collect();
        let got: Vec<(u64, i32, &str)> = lines
            .iter()
            .map(|l| (l.seq, l.stream, l.msg.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, LogStream::Stdout as i32, "one"),
                (2, LogStream::Stderr as i32, "two\u{fffd}"),
                (3, LogStream::Stdout as i32, "three"),
            ]
        );
    }

    #[tokio::test]
    async fn batches_cap_at_256_lines() {
        let outbox = SharedOutbox::new();
        let (mut out_w, out_r) = tokio::io::duplex(1 << 20);
        let (err_w, err_r) = tokio::io::duplex(16);
        let mut pump = LogPump::start("r1".into(), out_r, err_r, outbox.clone());
        let text: String = (0..600).map(|i| format!("{i}\n")).collect();
        out_w.write_all(text.as_bytes()).await.expect("write");
        drop(out_w);
        drop(err_w);
        assert!(pump.wait_for_eof(Duration::from_secs(2)).await);
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
}
