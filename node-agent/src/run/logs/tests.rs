use super::*;
use crate::run::journal::{Journal, RunRecord};
use std::io::Write as _;

fn texts(buf: &[u8], max: usize, at_eof: bool) -> Vec<&[u8]> {
    split_lines(buf, max, at_eof, &[])
        .into_iter()
        .map(|l| &buf[l.start..l.end])
        .collect()
}

#[test]
fn splits_complete_lines_and_keeps_the_tail_until_eof() {
    let buf = b"hello\nworld\n\nlast";
    assert_eq!(texts(buf, 1024, false), vec![&b"hello"[..], b"world", b""]);
    assert_eq!(
        split_lines(buf, 1024, false, &[]).last().map(|l| l.next),
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
    let lines = split_lines(b"abc\n", 3, false, &[]);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].next, 4);
}

#[test]
fn a_cut_never_splits_a_well_formed_character() {
    // A cut after 3 bytes would fall inside "é" (2 bytes) or "€" (3 bytes): it moves before it.
    assert_eq!(
        texts("aaé".as_bytes(), 3, true),
        vec!["aa".as_bytes(), "é".as_bytes()]
    );
    assert_eq!(
        texts("a€".as_bytes(), 3, true),
        vec!["a".as_bytes(), "€".as_bytes()]
    );
    assert_eq!(
        texts("aé€b".as_bytes(), 3, true),
        vec!["aé".as_bytes(), "€".as_bytes(), b"b"]
    );
    // The start of a character whose rest is not read yet moves to the next piece too.
    assert_eq!(texts(b"a\xe2\x82", 2, false), vec![&b"a"[..]]);
    assert_eq!(texts(b"aa\xc3", 2, false), vec![&b"aa"[..]]);
    // Invalid bytes are cut anywhere: there is no character to keep whole.
    assert_eq!(
        texts(b"\xff\xfe\xfd", 2, true),
        vec![&b"\xff\xfe"[..], b"\xfd"]
    );
    // A 4-byte character longer than the whole limit is still cut (never an empty piece).
    assert_eq!(texts("😀".as_bytes(), 2, true).len(), 2);
}

fn journal_dir(state: &std::path::Path) -> RunDir {
    Journal::new(state)
        .create(&RunRecord {
            run_id: "r1".to_string(),
            lease_epoch: 1,
            spec: Default::default(),
            image_digest: String::new(),
            started_at_unix_nanos: Some(1),
            container_id: None,
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
    let mut pump = LogPump::start(
        "r1".into(),
        &dir,
        0,
        LogLimits::default(),
        [],
        outbox.clone(),
    )
    .expect("pump");
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
async fn batches_cap_at_batch_max_lines() {
    let state = tempfile::tempdir().expect("tempdir");
    let dir = journal_dir(state.path());
    let outbox = SharedOutbox::new();
    let mut pump = LogPump::start(
        "r1".into(),
        &dir,
        0,
        LogLimits::default(),
        [],
        outbox.clone(),
    )
    .expect("pump");
    let total = BATCH_MAX_LINES * 2 + 100;
    let text: String = (0..total).map(|i| format!("{i}\n")).collect();
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
    assert!(sizes.len() >= 3, "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), total);
}

/// An agent process dies (the pump is dropped without finishing) with a partial line read;
/// the next process re-sends what was not acknowledged and continues with the next seq,
/// completing the partial line, with nothing lost or duplicated.
#[tokio::test]
async fn a_new_pump_resumes_after_a_crash_without_loss_or_duplicates() {
    let state = tempfile::tempdir().expect("tempdir");
    let dir = journal_dir(state.path());
    let first = SharedOutbox::new();
    let pump = LogPump::start(
        "r1".into(),
        &dir,
        0,
        LogLimits::default(),
        [],
        first.clone(),
    )
    .expect("pump");
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
    let mut pump = LogPump::start(
        "r1".into(),
        &dir,
        1,
        LogLimits::default(),
        [],
        second.clone(),
    )
    .expect("pump");
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

#[test]
fn the_budget_admits_until_a_line_does_not_fit_and_then_nothing() {
    let mut budget = LogBudget::new(LogLimits {
        max_bytes: 10,
        max_lines: 100,
    });
    assert!(budget.admit("abcd")); // 5
    assert!(budget.admit("")); // 6
    assert!(!budget.admit("abcd"), "11 > 10");
    assert!(!budget.admit(""), "nothing after the first refusal");
    assert_eq!(budget.bytes(), 6);
    assert_eq!(
        budget.take_marker().as_deref(),
        Some("[berth] log limit of 10 bytes reached; further output dropped")
    );
    assert_eq!(budget.take_marker(), None, "one marker only");

    let mut budget = LogBudget::new(LogLimits {
        max_bytes: 1000,
        max_lines: 2,
    });
    assert!(budget.admit("a") && budget.admit("b"));
    assert!(!budget.admit("c"));
    assert_eq!(
        budget.marker().as_deref(),
        Some("[berth] log limit of 2 lines reached; further output dropped")
    );
    assert_eq!(LogBudget::new(LogLimits::default()).take_marker(), None);
}

#[test]
fn the_budget_is_rebuilt_from_the_line_log() {
    let limits = LogLimits {
        max_bytes: 10,
        max_lines: 100,
    };
    let record = |msg: &str, marker: bool| LineRecord {
        seq: 1,
        stream: LogStream::Stdout as i32,
        next: 0,
        ts: 0,
        msg: msg.to_string(),
        marker,
    };
    let mut budget = LogBudget::from_records(limits, &[record("abc", false)]);
    assert_eq!(budget.bytes(), 4);
    assert!(budget.admit("abcde") && !budget.exhausted());
    let mut budget = LogBudget::from_records(
        limits,
        &[record("abc", false), record("[berth] log limit", true)],
    );
    assert!(budget.exhausted() && !budget.admit(""));
    assert_eq!(budget.take_marker(), None, "the marker is already logged");
}

/// A flood past the limit: lines up to the limit, one marker on stderr as the very last line,
/// nothing after it, and the consumed output punched out of the raw file.
#[tokio::test]
async fn output_past_the_limit_is_dropped_after_one_marker_and_freed_on_disk() {
    use std::os::unix::fs::MetadataExt as _;
    let state = tempfile::tempdir().expect("tempdir");
    let dir = journal_dir(state.path());
    let outbox = SharedOutbox::new();
    let limits = LogLimits {
        max_bytes: 1000,
        max_lines: 1000,
    };
    let mut pump = LogPump::start("r1".into(), &dir, 0, limits, [], outbox.clone()).expect("pump");
    let line = format!("{}\n", "y".repeat(99)); // 100 bytes each
    append(dir.stdout(), line.repeat(5).as_bytes());
    append(dir.stderr(), b"warn\n");
    tokio::time::sleep(POLL_INTERVAL * 5).await;
    let flood = line.repeat(40_000); // 4 MB
    append(dir.stdout(), flood.as_bytes());
    tokio::time::sleep(POLL_INTERVAL * 5).await;
    append(dir.stdout(), flood.as_bytes());
    append(dir.stderr(), b"late error\n");
    pump.finish().await;

    let lines = lines_of(&outbox);
    let seqs: Vec<u64> = lines.iter().map(|l| l.0).collect();
    assert_eq!(seqs, (1..=lines.len() as u64).collect::<Vec<_>>());
    let (marker, kept) = lines.split_last().expect("lines");
    assert_eq!(marker.1, LogStream::Stderr as i32);
    assert_eq!(
        marker.2,
        "[berth] log limit of 1000 bytes reached; further output dropped"
    );
    let bytes: usize = kept.iter().map(|l| l.2.len() + 1).sum();
    assert!(bytes <= 1000, "{bytes}");
    assert_eq!(
        kept.len(),
        9 + 1,
        "9 lines of 100 bytes and `warn`: {kept:?}"
    );
    assert!(!kept.iter().any(|l| l.2 == "late error"));

    let stdout = std::fs::metadata(dir.stdout()).expect("stdout");
    assert_eq!(stdout.len(), 500 + 2 * flood.len() as u64, "size is kept");
    assert!(
        stdout.blocks() * 512 < 64 * 1024,
        "consumed output is punched out: {} blocks",
        stdout.blocks()
    );

    // A restarted agent keeps the run capped and adds no second marker.
    append(dir.stdout(), b"after restart\n");
    let again = SharedOutbox::new();
    let mut pump = LogPump::start(
        "r1".into(),
        &dir,
        lines.len() as u64,
        limits,
        [],
        again.clone(),
    )
    .expect("pump");
    pump.finish().await;
    assert!(lines_of(&again).is_empty(), "{:?}", lines_of(&again));
}

#[tokio::test]
async fn the_line_limit_caps_short_lines() {
    let state = tempfile::tempdir().expect("tempdir");
    let dir = journal_dir(state.path());
    let outbox = SharedOutbox::new();
    let limits = LogLimits {
        max_bytes: u64::MAX,
        max_lines: 50,
    };
    let mut pump = LogPump::start("r1".into(), &dir, 0, limits, [], outbox.clone()).expect("pump");
    append(dir.stdout(), "y\n".repeat(10_000).as_bytes());
    pump.finish().await;
    let lines = lines_of(&outbox);
    assert_eq!(lines.len(), 51);
    assert!(lines[50].2.contains("50 lines"), "{:?}", lines[50]);
}

#[tokio::test]
async fn numbered_output_is_freed_on_disk_below_the_limit_too() {
    use std::os::unix::fs::MetadataExt as _;
    let state = tempfile::tempdir().expect("tempdir");
    let dir = journal_dir(state.path());
    let outbox = SharedOutbox::new();
    let mut pump = LogPump::start(
        "r1".into(),
        &dir,
        0,
        LogLimits::default(),
        [],
        outbox.clone(),
    )
    .expect("pump");
    let text = format!("{}\n", "z".repeat(999)).repeat(3000); // 3 MB, 3000 lines
    append(dir.stdout(), text.as_bytes());
    for _ in 0..200 {
        if lines_of(&outbox).len() == 3000 {
            break;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    assert_eq!(lines_of(&outbox).len(), 3000);
    let blocks = std::fs::metadata(dir.stdout()).expect("stdout").blocks();
    assert!(
        blocks * 512 < 1024 * 1024,
        "{blocks} blocks still allocated"
    );
    pump.finish().await;
}

fn batch_sizes(outbox: &SharedOutbox) -> Vec<usize> {
    outbox
        .snapshot()
        .iter()
        .filter(|m| matches!(m.body, Some(Body::LogBatch(_))))
        .map(prost::Message::encoded_len)
        .collect()
}

/// 100 lines of 64 KiB (6.4 MiB) once went out as one batch, above gRPC's 4 MiB: the scheduler
/// dropped the stream and the agent re-sent the same batch forever.
#[tokio::test]
async fn long_lines_go_out_in_messages_within_the_bound() {
    let state = tempfile::tempdir().expect("tempdir");
    let dir = journal_dir(state.path());
    let outbox = SharedOutbox::new();
    let mut pump = LogPump::start(
        "r1".into(),
        &dir,
        0,
        LogLimits::default(),
        [],
        outbox.clone(),
    )
    .expect("pump");
    let line = format!("{}\n", "j".repeat(65_536));
    append(dir.stdout(), line.repeat(100).as_bytes());
    // One 1 MiB line without a newline, and binary output (every invalid byte becomes three).
    append(dir.stderr(), "k".repeat(1 << 20).as_bytes());
    append(dir.stderr(), &[0xff; 300_000]);
    pump.finish().await;
    let sizes = batch_sizes(&outbox);
    assert!(sizes.iter().all(|n| *n <= MAX_MESSAGE_BYTES), "{sizes:?}");
    let lines = lines_of(&outbox);
    let out: Vec<&str> = lines
        .iter()
        .filter(|l| l.1 == LogStream::Stdout as i32)
        .map(|l| l.2.as_str())
        .collect();
    assert_eq!(out.len(), 100);
    assert!(out.iter().all(|l| l.len() == 65_536));
    let err: String = lines
        .iter()
        .filter(|l| l.1 == LogStream::Stderr as i32)
        .map(|l| l.2.as_str())
        .collect();
    assert_eq!(
        err,
        format!("{}{}", "k".repeat(1 << 20), "\u{fffd}".repeat(300_000))
    );
    let seqs: Vec<u64> = lines.iter().map(|l| l.0).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

/// A line log that an older agent numbered (and queued 256 lines at a time, whatever their
/// size) is re-sent after an upgrade in messages within the bound: the wedged node recovers.
#[tokio::test]
async fn lines_re_sent_after_a_restart_fit_the_bound_too() {
    let state = tempfile::tempdir().expect("tempdir");
    let dir = journal_dir(state.path());
    let (mut log, _, _) = LineLog::open(&dir.lines()).expect("line log");
    let records: Vec<LineRecord> = (1..=200u64)
        .map(|seq| LineRecord {
            seq,
            stream: LogStream::Stdout as i32,
            next: seq * 65_537,
            ts: 1,
            msg: "x".repeat(65_536),
            marker: false,
        })
        .collect();
    log.append(&records).expect("append");
    append(
        dir.stdout(),
        format!("{}\n", "x".repeat(65_536)).repeat(200).as_bytes(),
    );
    let outbox = SharedOutbox::new();
    let mut pump = LogPump::start(
        "r1".into(),
        &dir,
        10,
        LogLimits::default(),
        [],
        outbox.clone(),
    )
    .expect("pump");
    pump.finish().await;
    let sizes = batch_sizes(&outbox);
    assert!(sizes.iter().all(|n| *n <= MAX_MESSAGE_BYTES), "{sizes:?}");
    let seqs: Vec<u64> = lines_of(&outbox).iter().map(|l| l.0).collect();
    assert_eq!(seqs, (11..=200).collect::<Vec<_>>());
}

/// A secret that a 64 KiB cut would have split reaches the scheduler whole, at the start of the
/// next piece; the pieces still join back to the line.
#[tokio::test]
async fn a_long_line_is_never_cut_through_an_env_value() {
    let state = tempfile::tempdir().expect("tempdir");
    let dir = journal_dir(state.path());
    let outbox = SharedOutbox::new();
    let secret = "s3cr3t-VALUE-0123456789";
    let mut pump = LogPump::start(
        "r1".into(),
        &dir,
        0,
        LogLimits::default(),
        ["ok", secret],
        outbox.clone(),
    )
    .expect("pump");
    let mut line = "x".repeat(MAX_LINE_BYTES - 5);
    line.push_str(secret);
    line.push_str(&"y".repeat(100));
    append(dir.stdout(), format!("{line}\n").as_bytes());
    pump.finish().await;
    let pieces: Vec<String> = lines_of(&outbox).into_iter().map(|(_, _, m)| m).collect();
    assert_eq!(
        pieces.len(),
        2,
        "{:?}",
        pieces.iter().map(String::len).collect::<Vec<_>>()
    );
    assert_eq!(pieces[0].len(), MAX_LINE_BYTES - 5);
    assert!(
        pieces[1].starts_with(secret),
        "the secret opens the next piece"
    );
    assert_eq!(pieces.concat(), line);
}
