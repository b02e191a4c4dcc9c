//! How a run's log lines are stored: in compressed chunks, one store key per chunk instead of
//! one per line, so logs do not make the store (etcd above all) the bottleneck.
//!
//! A chunk holds consecutive lines of one run (ascending `seq`, no two the same) and is keyed by
//! its **last** line's seq, zero-padded ([`crate::keys::log`]): the lines after `S` start in the
//! first chunk whose key is ≥ `S + 1`, so reading on from any line is one ascending range read.
//! Chunks of a run never overlap: the scheduler stores only lines no chunk holds yet, and never
//! lets a new chunk straddle a stored one ([`plan`]).
//!
//! The value is [`FORMAT_V1`], a fixed header (first seq, last seq, line count, raw length) and
//! the lines deflated (pure-Rust `miniz_oxide`). A value that does not start with the format
//! byte is the older layout, one JSON [`LogEntry`] per key under the same key scheme: it reads
//! as a chunk of one line, so logs written by an older build stay readable as they are.
//!
//! Bounds: a chunk holds at most [`MAX_CHUNK_LINES`] lines and [`MAX_CHUNK_RAW_BYTES`] of
//! encoded lines (so at most that much compressed, plus deflate's few bytes of framing), except
//! a single line longer than that, which is a chunk of its own (the agent bounds one line at
//! about 1 MiB, below etcd's 1.5 MiB request limit).

use crate::keys;
use crate::model::{LogEntry, LogStream};
use crate::store::{Expect, Store, StoreError, Txn};
use std::time::Duration;

/// The first byte of a chunk value (an old per-line value is JSON and starts with `{`).
pub const FORMAT_V1: u8 = 1;
/// The most lines one chunk holds.
pub const MAX_CHUNK_LINES: usize = 1024;
/// The most encoded line bytes one chunk holds (unless one line alone is longer).
pub const MAX_CHUNK_RAW_BYTES: usize = 256 * 1024;
/// The most a chunk may inflate to: refuses a corrupt header before allocating.
const MAX_DECODED_BYTES: usize = 64 * 1024 * 1024;
/// format, first, last, count, raw length.
const HEADER: usize = 1 + 8 + 8 + 4 + 4;
/// seq, stream, timestamp, text length.
const LINE_HEADER: usize = 8 + 1 + 8 + 4;
/// Deflate level: 1, the fastest. Chunks are compressed on the path every log line takes, and
/// level 6 (zlib's default) cost the scheduler more time than anything else while a run wrote
/// fast; text still shrinks several-fold at level 1 (see `log-store` in docs/BENCHMARKS.md).
const LEVEL: u8 = 1;
/// Chunks read from the store at a time (each at most about 256 KiB).
pub const READ_CHUNKS: usize = 8;
/// The most chunk puts in one store transaction, and their most bytes: well inside etcd's 128
/// operations and 1.5 MiB per request.
const TXN_MAX_OPS: usize = 64;
const TXN_MAX_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    /// The value is neither a chunk nor an old per-line record.
    #[error("corrupt log chunk: {0}")]
    Corrupt(String),
}

/// Reading the stored chunks failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The value at `key` is not a chunk.
    #[error("{key}: {source}")]
    Corrupt { key: String, source: ChunkError },
}

fn corrupt(why: impl Into<String>) -> ChunkError {
    ChunkError::Corrupt(why.into())
}

/// The seq range a stored value covers, read without inflating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub first: u64,
    pub last: u64,
}

/// What one line adds to a chunk before compression.
pub fn raw_len(line: &LogEntry) -> usize {
    LINE_HEADER + line.msg.len()
}

/// Encodes `lines` (ascending seq, non-empty) as one chunk value.
pub fn encode(lines: &[LogEntry]) -> Vec<u8> {
    let raw_total: usize = lines.iter().map(raw_len).sum();
    let mut raw = Vec::with_capacity(raw_total);
    for line in lines {
        raw.extend_from_slice(&line.id.to_le_bytes());
        raw.push(match line.stream {
            LogStream::Stdout => 0,
            LogStream::Stderr => 1,
        });
        raw.extend_from_slice(&line.ts_unix_nanos.to_le_bytes());
        // A line is far below 4 GiB (the agent cuts at about 1 MiB).
        raw.extend_from_slice(
            &u32::try_from(line.msg.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        raw.extend_from_slice(line.msg.as_bytes());
    }
    let packed = miniz_oxide::deflate::compress_to_vec(&raw, LEVEL);
    let first = lines.first().map_or(0, |l| l.id);
    let last = lines.last().map_or(0, |l| l.id);
    let mut out = Vec::with_capacity(HEADER + packed.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&last.to_le_bytes());
    out.extend_from_slice(&u32::try_from(lines.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&u32::try_from(raw.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&packed);
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> usize {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x) as usize
}

fn old_line(value: &[u8]) -> Result<LogEntry, ChunkError> {
    serde_json::from_slice(value).map_err(|e| corrupt(format!("old per-line record: {e}")))
}

/// The seq range of a stored value (a chunk, or an old per-line record).
pub fn span(value: &[u8]) -> Result<Span, ChunkError> {
    if value.first() == Some(&FORMAT_V1) {
        if value.len() < HEADER {
            return Err(corrupt("truncated header"));
        }
        return Ok(Span {
            first: u64_at(value, 1),
            last: u64_at(value, 9),
        });
    }
    let line = old_line(value)?;
    Ok(Span {
        first: line.id,
        last: line.id,
    })
}

/// The lines of a stored value (a chunk, or an old per-line record), ascending.
pub fn decode(value: &[u8]) -> Result<Vec<LogEntry>, ChunkError> {
    if value.first() != Some(&FORMAT_V1) {
        return Ok(vec![old_line(value)?]);
    }
    if value.len() < HEADER {
        return Err(corrupt("truncated header"));
    }
    let count = u32_at(value, 17);
    let raw_len = u32_at(value, 21);
    if raw_len > MAX_DECODED_BYTES || count > raw_len / LINE_HEADER {
        return Err(corrupt(format!("{count} lines in {raw_len} bytes")));
    }
    let raw = miniz_oxide::inflate::decompress_to_vec_with_limit(&value[HEADER..], raw_len)
        .map_err(|e| corrupt(format!("inflate: {e:?}")))?;
    if raw.len() != raw_len {
        return Err(corrupt("length differs from the header"));
    }
    let mut lines = Vec::with_capacity(count);
    let mut at = 0;
    while at < raw.len() {
        if raw.len() - at < LINE_HEADER {
            return Err(corrupt("truncated line"));
        }
        let id = u64_at(&raw, at);
        let stream = match raw[at + 8] {
            0 => LogStream::Stdout,
            1 => LogStream::Stderr,
            other => return Err(corrupt(format!("stream {other}"))),
        };
        let ts_unix_nanos = i64::from_le_bytes(u64_at(&raw, at + 9).to_le_bytes());
        let len = u32_at(&raw, at + 17);
        at += LINE_HEADER;
        let text = raw
            .get(at..at + len)
            .ok_or_else(|| corrupt("truncated text"))?;
        let msg = String::from_utf8(text.to_vec()).map_err(|_| corrupt("text is not UTF-8"))?;
        at += len;
        lines.push(LogEntry {
            id,
            stream,
            msg,
            ts_unix_nanos,
        });
    }
    if lines.len() != count {
        return Err(corrupt("line count differs from the header"));
    }
    Ok(lines)
}

/// The chunks to store for a batch of `lines`, given the spans already stored that may overlap
/// it (any order): drops lines seq 0, lines repeated in the batch and lines a stored span covers
/// (a re-sent batch, however it is cut, stores each line once), then cuts what is left into
/// chunks within the bounds that never straddle a stored span. Each chunk is ascending.
pub fn plan(mut lines: Vec<LogEntry>, stored: &[Span]) -> Vec<Vec<LogEntry>> {
    lines.retain(|l| l.id != 0);
    // Stable: of two lines with one seq, the first sent is kept.
    lines.sort_by_key(|l| l.id);
    lines.dedup_by_key(|l| l.id);
    let covered = |seq: u64| stored.iter().any(|s| s.first <= seq && seq <= s.last);
    let stored_between = |a: u64, b: u64| stored.iter().any(|s| s.first > a && s.first < b);
    let mut chunks: Vec<Vec<LogEntry>> = Vec::new();
    let mut current: Vec<LogEntry> = Vec::new();
    let mut bytes = 0;
    for line in lines {
        if covered(line.id) {
            continue;
        }
        let cost = raw_len(&line);
        let cut = current.last().is_some_and(|prev| {
            current.len() >= MAX_CHUNK_LINES
                || bytes + cost > MAX_CHUNK_RAW_BYTES
                || stored_between(prev.id, line.id)
        });
        if cut {
            chunks.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += cost;
        current.push(line);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// The spans of the run's stored chunks that may hold lines `first..=last`, ascending: one
/// range read from the first chunk keyed at or after `first` (usually empty: a batch is new).
pub async fn stored_spans<S: Store>(
    store: &S,
    run_id: &str,
    first: u64,
    last: u64,
) -> Result<Vec<Span>, ReadError> {
    let end = keys::prefix_end(&keys::logs_prefix(run_id));
    let mut from = keys::log(run_id, first);
    let mut spans = Vec::new();
    loop {
        let kvs = store.range(&from, &end, READ_CHUNKS).await?;
        for kv in &kvs {
            let span = span(&kv.value).map_err(|source| ReadError::Corrupt {
                key: kv.key.clone(),
                source,
            })?;
            if span.first > last {
                return Ok(spans);
            }
            spans.push(span);
            from = keys::log(run_id, span.last.saturating_add(1));
        }
        if kvs.len() < READ_CHUNKS {
            return Ok(spans);
        }
    }
}

/// The transactions that store `chunks` (from [`plan`]) of a run, each well within etcd's
/// request limits, every put expiring after `retention` (if any). Unconditional: no stored
/// chunk overlaps these, so the etcd store may merge them with other writes.
pub fn txns(run_id: &str, chunks: Vec<Vec<LogEntry>>, retention: Option<Duration>) -> Vec<Txn> {
    let mut out = Vec::new();
    let mut txn = Txn::new();
    let mut bytes = 0;
    for chunk in chunks {
        let Some(last) = chunk.last().map(|l| l.id) else {
            continue;
        };
        let value = encode(&chunk);
        if !txn.is_empty() && (txn.ops.len() >= TXN_MAX_OPS || bytes + value.len() > TXN_MAX_BYTES)
        {
            out.push(std::mem::take(&mut txn));
            bytes = 0;
        }
        bytes += value.len();
        let key = keys::log(run_id, last);
        txn = match retention {
            Some(ttl) => txn.put_expiring(key, value, Expect::Any, ttl),
            None => txn.put(key, value, Expect::Any),
        };
    }
    if !txn.is_empty() {
        out.push(txn);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: u64, msg: &str) -> LogEntry {
        LogEntry {
            id,
            stream: if id.is_multiple_of(2) {
                LogStream::Stderr
            } else {
                LogStream::Stdout
            },
            msg: msg.to_owned(),
            ts_unix_nanos: 1_700_000_000_000_000_000 + id as i64,
        }
    }

    #[test]
    fn round_trips_text_unicode_control_bytes_and_empty_lines() {
        let lines = vec![
            line(1, "hello"),
            line(2, ""),
            line(3, "żółw 🐢 \u{0} \u{7f} \t\r tab"),
            line(7, &"x".repeat(100_000)),
            LogEntry {
                ts_unix_nanos: -5,
                ..line(9, "negative timestamp")
            },
        ];
        let value = encode(&lines);
        assert_eq!(value[0], FORMAT_V1);
        assert_eq!(decode(&value), Ok(lines.clone()));
        assert_eq!(span(&value), Ok(Span { first: 1, last: 9 }));
        assert!(
            value.len() < 2_000,
            "{} bytes: repetitive text compresses",
            value.len()
        );
    }

    #[test]
    fn an_old_per_line_record_reads_as_a_chunk_of_one() {
        let old = serde_json::to_vec(&line(42, "from an older build")).expect("json");
        assert_eq!(decode(&old), Ok(vec![line(42, "from an older build")]));
        assert_eq!(
            span(&old),
            Ok(Span {
                first: 42,
                last: 42
            })
        );
    }

    #[test]
    fn corrupt_values_are_errors_not_panics() {
        let value = encode(&[line(1, "a"), line(2, "b")]);
        for cut in 0..value.len() {
            let _ = decode(&value[..cut]);
            let _ = span(&value[..cut]);
        }
        let mut flipped = value.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        // A damaged body fails to inflate or to parse; either way an error, never a panic.
        let _ = decode(&flipped);
        let mut huge = value;
        huge[21..25].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            decode(&huge).is_err(),
            "a lying length is refused before inflating"
        );
        assert!(decode(b"\x01").is_err());
        assert!(decode(b"not json").is_err());
    }

    #[test]
    fn a_huge_batch_is_cut_within_the_bounds() {
        let many: Vec<LogEntry> = (1..=5000).map(|i| line(i, "short line")).collect();
        let chunks = plan(many, &[]);
        assert_eq!(chunks.len(), 5, "1024 lines a chunk");
        assert!(chunks.iter().all(|c| c.len() <= MAX_CHUNK_LINES));
        let long: Vec<LogEntry> = (1..=40).map(|i| line(i, &"y".repeat(60_000))).collect();
        let chunks = plan(long, &[]);
        for c in &chunks {
            let raw: usize = c.iter().map(raw_len).sum();
            assert!(raw <= MAX_CHUNK_RAW_BYTES, "{raw}");
            assert!(encode(c).len() <= MAX_CHUNK_RAW_BYTES + HEADER + 64);
        }
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 40);
        let giant = vec![line(1, "a"), line(2, &"z".repeat(900_000)), line(3, "b")];
        let chunks = plan(giant, &[]);
        let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(
            sizes,
            [1, 1, 1],
            "a line above the bound is a chunk of its own"
        );
    }

    #[test]
    fn lines_already_stored_are_dropped_and_chunks_never_straddle_a_stored_span() {
        let batch: Vec<LogEntry> = (1..=10).map(|i| line(i, "l")).collect();
        let stored = [Span { first: 3, last: 4 }, Span { first: 8, last: 8 }];
        let chunks = plan(batch, &stored);
        let ids: Vec<Vec<u64>> = chunks
            .iter()
            .map(|c| c.iter().map(|l| l.id).collect())
            .collect();
        assert_eq!(ids, [vec![1, 2], vec![5, 6, 7], vec![9, 10]]);
        let everything = [Span { first: 1, last: 10 }];
        assert!(plan((1..=10).map(|i| line(i, "l")).collect(), &everything).is_empty());
    }

    #[test]
    fn transactions_stay_within_etcd_limits() {
        let many: Vec<LogEntry> = (1..=200_000).map(|i| line(i, "short line")).collect();
        let written = txns("r", plan(many, &[]), Some(Duration::from_secs(60)));
        assert!(written.len() > 1);
        for t in &written {
            assert!(t.ops.len() <= 128);
            let bytes: usize = t
                .ops
                .iter()
                .map(|op| match op {
                    crate::store::Op::Put {
                        key, value, ttl, ..
                    } => {
                        assert_eq!(*ttl, Some(Duration::from_secs(60)));
                        key.len() + value.len()
                    }
                    crate::store::Op::Delete { key, .. } => key.len(),
                })
                .sum();
            assert!(bytes <= 1536 * 1024 - 64 * 1024, "{bytes}");
        }
        let big: Vec<LogEntry> = (1..=12u64)
            .map(|i| {
                // Barely compressible: pseudo-random letters (xorshift).
                let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let msg: String = (0..200_000)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        char::from(b'a' + (x % 26) as u8)
                    })
                    .collect();
                line(i, &msg)
            })
            .collect();
        for t in txns("r", plan(big, &[]), None) {
            let bytes: usize = t
                .ops
                .iter()
                .map(|op| match op {
                    crate::store::Op::Put { value, .. } => value.len(),
                    crate::store::Op::Delete { .. } => 0,
                })
                .sum();
            assert!(bytes <= 1024 * 1024 + 64 * 1024, "{bytes}");
        }
    }

    #[test]
    fn seq_zero_and_repeats_within_a_batch_are_dropped_and_order_is_restored() {
        let batch = vec![
            line(3, "c"),
            line(0, "zero"),
            line(1, "a"),
            line(3, "again"),
            line(2, "b"),
        ];
        let chunks = plan(batch, &[]);
        assert_eq!(chunks.len(), 1);
        let got: Vec<(u64, &str)> = chunks[0].iter().map(|l| (l.id, l.msg.as_str())).collect();
        assert_eq!(got, [(1, "a"), (2, "b"), (3, "c")]);
    }
}
