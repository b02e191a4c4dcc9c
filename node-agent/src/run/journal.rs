//! What the agent keeps on disk per run, so that a restarted agent process (after a crash or
//! `kill -9`) can re-adopt the run's container and re-send every report the scheduler has not
//! acknowledged. Everything lives in `<state dir>/runs/<run id>/`:
//!
//! - `run.json`: the assignment (run id, lease epoch, spec without registry credentials), the
//!   image digest and, once the task started, its start time. Written atomically.
//! - `stdout`, `stderr`: the container's raw output. These are regular files that containerd's
//!   shim appends to directly, so output is captured even while no agent process is alive.
//! - `lines`: the line log, one record per numbered log line (`seq`, stream, the offset in the
//!   raw file just after the line, timestamp, text). A line is appended here *before* it enters
//!   the outbox, so a restart never numbers a line twice or differently; the raw offsets say where
//!   to continue splitting. Records are binary and length-prefixed ([`LineLog`]); a log written by
//!   an older agent holds JSON records, which are still read (and may be followed by binary ones).
//! - `acked`: the highest line `seq` the scheduler acknowledged (an optimisation: lines above it
//!   are re-sent after a restart, and the scheduler de-duplicates anyway).
//! - `exit.json`: how the run ended, written before cleanup, so the `RunExited` survives too.
//! - `files/`: the run's uploaded files (`crate::run::files`), mounted read-only into the container;
//!   removed at cleanup. `run.json` keeps the spec without them.
//!
//! The directory is removed once the scheduler acknowledged the run's `RunExited`.
//!
//! Durability is against the agent process dying, not the host: files are not fsynced (a host
//! crash takes the containers with it).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use berth_core::secrets::SecretKey;
use berth_proto::v1::{ExitReason, LogStream, RunSpec};
use prost::Message as _;
use serde::{Deserialize, Serialize};

const RUN_FILE: &str = "run.json";
const EXIT_FILE: &str = "exit.json";
const ACKED_FILE: &str = "acked";
const LINES_FILE: &str = "lines";
const STDOUT_FILE: &str = "stdout";
const STDERR_FILE: &str = "stderr";

/// Journal failures.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// a journal file could not be read or written
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    /// a journal file does not hold what it should
    #[error("{path}: corrupt: {message}")]
    Corrupt { path: String, message: String },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers see the old or
/// the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), JournalError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

/// The persisted assignment of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub run_id: String,
    pub lease_epoch: u64,
    /// The spec, with `registry_auth` removed (the pull is over once this is written).
    pub spec: RunSpec,
    pub image_digest: String,
    /// containerd start time (unix nanoseconds) once the task was started.
    pub started_at_unix_nanos: Option<i64>,
    /// The container the run started in when it is not the run's own (a ready sandbox, see
    /// `run::sandboxes`); None: the container's id is the run id.
    pub container_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct RunRecordFile {
    run_id: String,
    lease_epoch: u64,
    /// The `RunSpec` protobuf, base64, without its environment.
    spec: String,
    /// The environment (its values may be secrets), as JSON sealed with the journal key and
    /// bound to the run id. Absent in journals of older builds, which kept it in `spec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    env_sealed: Option<String>,
    image_digest: String,
    started_at_unix_nanos: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    container_id: Option<String>,
}

/// The key that seals run environments in `run.json`, in the agent's state directory (0600).
/// It guards what a copy of the run journals alone would show (a backup, a support bundle);
/// whoever can read the agent's key can read its runs, like the agent itself.
const JOURNAL_KEY_FILE: &str = "journal.key";

/// How a run ended, as persisted before cleanup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// `ExitReason` as its protobuf number.
    pub reason: i32,
    pub exit_code: i32,
    pub exited_at_unix_nanos: i64,
    pub error_code: String,
    pub error_message: String,
    /// Absent in records of older agents.
    #[serde(default)]
    pub oom_killed: bool,
}

impl ExitRecord {
    pub fn reason(&self) -> ExitReason {
        ExitReason::try_from(self.reason).unwrap_or(ExitReason::Unspecified)
    }
}

/// One numbered log line as persisted in the line log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineRecord {
    pub seq: u64,
    /// `LogStream` as its protobuf number.
    pub stream: i32,
    /// Offset in the stream's raw file right after this line (and its newline, if any).
    pub next: u64,
    pub ts: i64,
    pub msg: String,
    /// The agent's own "log limit reached" line, not output of the run.
    #[serde(default, skip_serializing_if = "is_false")]
    pub marker: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Where the line log left off: the next `seq` and, per stream, the raw offset to continue at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineCursor {
    pub next_seq: u64,
    pub stdout_offset: u64,
    pub stderr_offset: u64,
}

impl Default for LineCursor {
    fn default() -> Self {
        Self {
            next_seq: 1,
            stdout_offset: 0,
            stderr_offset: 0,
        }
    }
}

impl LineCursor {
    pub fn offset(&self, stream: LogStream) -> u64 {
        match stream {
            LogStream::Stderr => self.stderr_offset,
            _ => self.stdout_offset,
        }
    }

    fn advance(&mut self, line: &LineRecord) {
        self.next_seq = self.next_seq.max(line.seq + 1);
        if line.stream == LogStream::Stderr as i32 {
            self.stderr_offset = line.next;
        } else {
            self.stdout_offset = line.next;
        }
    }
}

/// The append-only line log of one run.
#[derive(Debug)]
pub struct LineLog {
    path: PathBuf,
    file: File,
}

/// The first byte of a binary line-log record (a JSON record, from an older agent, starts with
/// `{`). Then the payload's length (u32, little-endian) and the payload: seq (u64), stream (i32),
/// next (u64), ts (i64), marker (one byte, 0 or 1), the text (UTF-8, the rest). Binary because
/// every byte a run logs passes through here: serialising it as JSON cost the agent more time
/// than splitting it into lines.
const BINARY_RECORD: u8 = 0x01;
const BINARY_HEADER: usize = 1 + 4;
const BINARY_FIXED: usize = 8 + 4 + 8 + 8 + 1;

fn encode_record(buf: &mut Vec<u8>, line: &LineRecord) {
    let len = BINARY_FIXED + line.msg.len();
    buf.push(BINARY_RECORD);
    // A line is at most a few hundred KiB (`logs::MAX_LINE_BYTES` of output).
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    buf.extend_from_slice(&line.seq.to_le_bytes());
    buf.extend_from_slice(&line.stream.to_le_bytes());
    buf.extend_from_slice(&line.next.to_le_bytes());
    buf.extend_from_slice(&line.ts.to_le_bytes());
    buf.push(u8::from(line.marker));
    buf.extend_from_slice(line.msg.as_bytes());
}

fn decode_payload(p: &[u8]) -> Option<LineRecord> {
    let fixed = p.get(..BINARY_FIXED)?;
    let u64_at = |at: usize| fixed[at..at + 8].try_into().ok().map(u64::from_le_bytes);
    let marker = match fixed[28] {
        0 => false,
        1 => true,
        _ => return None,
    };
    Some(LineRecord {
        seq: u64_at(0)?,
        stream: i32::from_le_bytes(fixed[8..12].try_into().ok()?),
        next: u64_at(12)?,
        ts: i64::from_le_bytes(fixed[20..28].try_into().ok()?),
        marker,
        msg: std::str::from_utf8(&p[BINARY_FIXED..]).ok()?.to_owned(),
    })
}

/// Reads the next record (binary or JSON) and the bytes it took; `None` at the end of the log
/// or at a torn or unreadable record.
fn read_record(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
) -> io::Result<Option<(LineRecord, u64)>> {
    buf.clear();
    let first = match reader.fill_buf()?.first() {
        Some(b) => *b,
        None => return Ok(None),
    };
    if first == BINARY_RECORD {
        let mut header = [0u8; BINARY_HEADER];
        if read_full(reader, &mut header)? < BINARY_HEADER {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&header[1..]);
        let len = u32::from_le_bytes(len) as usize;
        if !(BINARY_FIXED..=16 * 1024 * 1024).contains(&len) {
            return Ok(None);
        }
        buf.resize(len, 0);
        if read_full(reader, buf)? < len {
            return Ok(None);
        }
        return Ok(decode_payload(buf).map(|r| (r, (BINARY_HEADER + len) as u64)));
    }
    let n = reader.read_until(b'\n', buf)?;
    if n == 0 || buf.last() != Some(&b'\n') {
        return Ok(None);
    }
    Ok(serde_json::from_slice::<LineRecord>(buf)
        .ok()
        .map(|r| (r, n as u64)))
}

/// Reads until `buf` is full or the input ends; the bytes read.
fn read_full(reader: &mut impl io::Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

impl LineLog {
    /// Opens the log, dropping a torn last record (the agent died mid-append), and returns the
    /// complete records with the cursor they imply.
    pub fn open(path: &Path) -> Result<(Self, Vec<LineRecord>, LineCursor), JournalError> {
        let mut records = Vec::new();
        let mut cursor = LineCursor::default();
        let mut valid_len: u64 = 0;
        match File::open(path) {
            Ok(file) => {
                let mut reader = BufReader::new(file);
                let mut buf = Vec::new();
                while let Some((record, n)) =
                    read_record(&mut reader, &mut buf).map_err(io_error(path))?
                {
                    valid_len += n;
                    cursor.advance(&record);
                    records.push(record);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(path)(e)),
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_error(path))?;
        let len = file.metadata().map_err(io_error(path))?.len();
        if len > valid_len {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = len - valid_len,
                "dropping a torn record at the end of the line log"
            );
            file.set_len(valid_len).map_err(io_error(path))?;
        }
        Ok((
            Self {
                path: path.to_path_buf(),
                file,
            },
            records,
            cursor,
        ))
    }

    pub fn append(&mut self, lines: &[LineRecord]) -> Result<(), JournalError> {
        if lines.is_empty() {
            return Ok(());
        }
        let bytes: usize = lines
            .iter()
            .map(|l| BINARY_HEADER + BINARY_FIXED + l.msg.len())
            .sum();
        let mut buf = Vec::with_capacity(bytes);
        for line in lines {
            encode_record(&mut buf, line);
        }
        self.file.write_all(&buf).map_err(io_error(&self.path))
    }
}

/// The paths of one run's journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    pub dir: PathBuf,
    key: JournalKey,
}

/// The journal key, read (or created) on first use and kept: every run's `run.json` is sealed
/// and opened with it.
#[derive(Debug, Clone)]
struct JournalKey {
    file: PathBuf,
    loaded: std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<SecretKey>>>>,
}

/// Two handles are the same key when they name the same file.
impl PartialEq for JournalKey {
    fn eq(&self, other: &Self) -> bool {
        self.file == other.file
    }
}

impl Eq for JournalKey {}

impl JournalKey {
    fn get(&self) -> Result<std::sync::Arc<SecretKey>, JournalError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(key) = loaded.as_ref() {
            return Ok(key.clone());
        }
        let key = std::sync::Arc::new(SecretKey::load_or_create(&self.file).map_err(|e| {
            JournalError::Corrupt {
                path: self.file.display().to_string(),
                message: e.to_string(),
            }
        })?);
        *loaded = Some(key.clone());
        Ok(key)
    }
}

impl RunDir {
    fn key(&self) -> Result<std::sync::Arc<SecretKey>, JournalError> {
        self.key.get()
    }

    pub fn stdout(&self) -> PathBuf {
        self.dir.join(STDOUT_FILE)
    }
    pub fn stderr(&self) -> PathBuf {
        self.dir.join(STDERR_FILE)
    }
    pub fn lines(&self) -> PathBuf {
        self.dir.join(LINES_FILE)
    }
    pub fn raw(&self, stream: LogStream) -> PathBuf {
        match stream {
            LogStream::Stderr => self.stderr(),
            _ => self.stdout(),
        }
    }

    /// Records the start time (and keeps everything else).
    pub fn mark_started(
        &self,
        record: &mut RunRecord,
        started_at_unix_nanos: i64,
    ) -> Result<(), JournalError> {
        record.started_at_unix_nanos = Some(started_at_unix_nanos);
        self.write_record(record)
    }

    /// Writes `run.json`, always without registry credentials and without the uploaded files'
    /// content (they live in `files/`, see `crate::run::files`; a re-adopted task has them mounted).
    fn write_record(&self, record: &RunRecord) -> Result<(), JournalError> {
        let path = self.dir.join(RUN_FILE);
        let spec = RunSpec {
            registry_auth: None,
            files: Vec::new(),
            env: Default::default(),
            ..record.spec.clone()
        };
        let env_sealed = if record.spec.env.is_empty() {
            None
        } else {
            let env = serde_json::to_vec(&record.spec.env).map_err(|e| JournalError::Corrupt {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            let sealed =
                self.key()?
                    .seal(&record.run_id, &env)
                    .map_err(|e| JournalError::Corrupt {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })?;
            Some(sealed)
        };
        let file = RunRecordFile {
            run_id: record.run_id.clone(),
            lease_epoch: record.lease_epoch,
            spec: base64::engine::general_purpose::STANDARD.encode(spec.encode_to_vec()),
            env_sealed,
            image_digest: record.image_digest.clone(),
            started_at_unix_nanos: record.started_at_unix_nanos,
            container_id: record.container_id.clone(),
        };
        let bytes = serde_json::to_vec(&file).map_err(|e| JournalError::Corrupt {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        write_atomic(&path, &bytes)
    }

    pub fn read_record(&self) -> Result<RunRecord, JournalError> {
        let path = self.dir.join(RUN_FILE);
        let bytes = std::fs::read(&path).map_err(io_error(&path))?;
        let corrupt = |message: String| JournalError::Corrupt {
            path: path.display().to_string(),
            message,
        };
        let file: RunRecordFile =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        let spec_bytes = base64::engine::general_purpose::STANDARD
            .decode(file.spec)
            .map_err(|e| corrupt(e.to_string()))?;
        let mut spec =
            RunSpec::decode(spec_bytes.as_slice()).map_err(|e| corrupt(e.to_string()))?;
        if let Some(sealed) = &file.env_sealed {
            let env = self
                .key()?
                .open(&file.run_id, sealed)
                .map_err(|e| corrupt(format!("the sealed environment: {e}")))?;
            spec.env = serde_json::from_slice(&env).map_err(|e| corrupt(e.to_string()))?;
        }
        Ok(RunRecord {
            run_id: file.run_id,
            lease_epoch: file.lease_epoch,
            spec,
            image_digest: file.image_digest,
            started_at_unix_nanos: file.started_at_unix_nanos,
            container_id: file.container_id,
        })
    }

    pub fn write_exit(&self, exit: &ExitRecord) -> Result<(), JournalError> {
        let path = self.dir.join(EXIT_FILE);
        let bytes = serde_json::to_vec(exit).map_err(|e| JournalError::Corrupt {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        write_atomic(&path, &bytes)
    }

    pub fn read_exit(&self) -> Result<Option<ExitRecord>, JournalError> {
        let path = self.dir.join(EXIT_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| JournalError::Corrupt {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&path)(e)),
        }
    }

    /// Raises the acknowledged line seq to `seq` (never lowers it). Does nothing when the
    /// directory is gone (the run was already forgotten).
    pub fn write_acked(&self, seq: u64) -> Result<(), JournalError> {
        if !self.dir.is_dir() || self.read_acked() >= seq {
            return Ok(());
        }
        write_atomic(&self.dir.join(ACKED_FILE), seq.to_string().as_bytes())
    }

    /// The highest acknowledged line seq (0 when unknown).
    pub fn read_acked(&self) -> u64 {
        std::fs::read_to_string(self.dir.join(ACKED_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// All run journals of this agent: `<state dir>/runs/`.
#[derive(Debug, Clone)]
pub struct Journal {
    root: PathBuf,
    key: JournalKey,
}

impl Journal {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            root: state_dir.join("runs"),
            key: JournalKey {
                file: state_dir.join(JOURNAL_KEY_FILE),
                loaded: Default::default(),
            },
        }
    }

    pub fn run_dir(&self, run_id: &str) -> RunDir {
        RunDir {
            dir: self.root.join(run_id),
            key: self.key.clone(),
        }
    }

    /// Starts the journal of a run: the directory, `run.json` (without registry credentials)
    /// and empty output files for the shim to append to. A leftover journal of the same run
    /// (an earlier, abandoned attempt) is replaced.
    pub fn create(&self, record: &RunRecord) -> Result<RunDir, JournalError> {
        let run_dir = self.run_dir(&record.run_id);
        self.remove(&record.run_id);
        std::fs::create_dir_all(&run_dir.dir).map_err(io_error(&run_dir.dir))?;
        run_dir.write_record(record)?;
        for path in [run_dir.stdout(), run_dir.stderr()] {
            File::create(&path).map_err(io_error(&path))?;
        }
        Ok(run_dir)
    }

    /// Run ids that have a journal (a `run.json`).
    pub fn list(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().join(RUN_FILE).is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        ids.sort();
        ids
    }

    /// Removes run directories without a `run.json` (an agent died while creating one); what
    /// they hold (output files, uploaded files) belongs to no run this agent can re-adopt.
    pub fn remove_orphans(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() && !path.join(RUN_FILE).is_file() {
                tracing::warn!(path = %path.display(), "removing a run directory without a journal");
                if let Err(error) = std::fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), %error, "removing it failed");
                }
            }
        }
    }

    /// Forgets a run: removes its directory (missing is fine).
    pub fn remove(&self, run_id: &str) {
        let dir = self.run_dir(run_id).dir;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(run_id, path = %dir.display(), %error, "removing run journal failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::v1::RegistryAuth;

    fn record() -> RunRecord {
        RunRecord {
            run_id: "r1".to_string(),
            lease_epoch: 4,
            spec: RunSpec {
                image: "127.0.0.1:5001/busybox:latest".to_string(),
                timeout_seconds: 30,
                registry_auth: Some(RegistryAuth {
                    host: "127.0.0.1:5001".to_string(),
                    username: "u".to_string(),
                    password: "secret-password".to_string(),
                }),
                ..Default::default()
            },
            image_digest: "sha256:abc".to_string(),
            started_at_unix_nanos: None,
            container_id: None,
        }
    }

    fn line(seq: u64, stream: LogStream, next: u64, msg: &str) -> LineRecord {
        LineRecord {
            seq,
            stream: stream as i32,
            next,
            ts: 7,
            msg: msg.to_string(),
            marker: false,
        }
    }

    /// The run's environment (secret values among it) is sealed in `run.json`, bound to the
    /// run: not in clear, not even as the base64 protobuf, and not readable under another run.
    #[test]
    fn the_environment_is_sealed_in_the_journal() {
        let state = tempfile::tempdir().expect("tempdir");
        let journal = Journal::new(state.path());
        let mut rec = record();
        rec.spec
            .env
            .insert("API_TOKEN".into(), "tok-9f8e7d6c5b4a".into());
        let dir = journal.create(&rec).expect("create");
        let raw = std::fs::read(dir.dir.join(RUN_FILE)).expect("read");
        let text = String::from_utf8_lossy(&raw);
        assert!(!text.contains("tok-9f8e7d6c5b4a"), "{text}");
        let file: RunRecordFile = serde_json::from_slice(&raw).expect("json");
        let spec = base64::engine::general_purpose::STANDARD
            .decode(&file.spec)
            .expect("b64");
        assert!(
            !spec.windows(16).any(|w| w == b"tok-9f8e7d6c5b4a"),
            "not in the encoded spec"
        );
        assert_eq!(
            dir.read_record()
                .expect("load")
                .spec
                .env
                .get("API_TOKEN")
                .map(String::as_str),
            Some("tok-9f8e7d6c5b4a")
        );
        // Moved under another run, the sealed environment does not open.
        let mut moved = file;
        moved.run_id = "r2".into();
        std::fs::write(
            dir.dir.join(RUN_FILE),
            serde_json::to_vec(&moved).expect("json"),
        )
        .expect("write");
        assert!(dir.read_record().is_err());
    }

    #[test]
    fn record_round_trips_without_credentials() {
        let state = tempfile::tempdir().expect("tempdir");
        let journal = Journal::new(state.path());
        let dir = journal.create(&record()).expect("create");
        assert!(dir.stdout().is_file() && dir.stderr().is_file());
        let raw = std::fs::read_to_string(dir.dir.join(RUN_FILE)).expect("read");
        assert!(!raw.contains("secret-password"));
        let mut loaded = dir.read_record().expect("load");
        assert_eq!(loaded.spec.registry_auth, None);
        assert_eq!(loaded.spec.timeout_seconds, 30);
        assert_eq!(loaded.started_at_unix_nanos, None);
        // The supervisor's in-memory record still holds the credentials: never written.
        let mut in_memory = record();
        dir.mark_started(&mut in_memory, 99).expect("mark");
        assert_eq!(dir.read_record().expect("load").spec.registry_auth, None);
        dir.mark_started(&mut loaded, 99).expect("mark");
        assert_eq!(
            dir.read_record().expect("load").started_at_unix_nanos,
            Some(99)
        );
        assert_eq!(journal.list(), vec!["r1".to_string()]);
        journal.remove("r1");
        assert!(journal.list().is_empty());
        journal.remove("r1");
    }

    #[test]
    fn directories_without_a_journal_are_removed_and_journals_kept() {
        let state = tempfile::tempdir().expect("tempdir");
        let journal = Journal::new(state.path());
        let kept = journal.create(&record()).expect("create");
        let orphan = state.path().join("runs/half-created/files");
        std::fs::create_dir_all(&orphan).expect("mkdir");
        std::fs::write(orphan.join("0"), "x").expect("write");
        journal.remove_orphans();
        assert!(!state.path().join("runs/half-created").exists());
        assert!(kept.dir.join(RUN_FILE).is_file());
        assert_eq!(journal.list(), vec!["r1".to_string()]);
    }

    #[test]
    fn exit_and_acked_survive_and_acked_never_goes_down() {
        let state = tempfile::tempdir().expect("tempdir");
        let journal = Journal::new(state.path());
        let dir = journal.create(&record()).expect("create");
        assert_eq!(dir.read_exit().expect("read"), None);
        let exit = ExitRecord {
            reason: ExitReason::Exited as i32,
            exit_code: 137,
            exited_at_unix_nanos: 11,
            error_code: String::new(),
            error_message: String::new(),
            oom_killed: true,
        };
        dir.write_exit(&exit).expect("write");
        assert_eq!(dir.read_exit().expect("read"), Some(exit.clone()));
        // Records written before `oom_killed` existed still read.
        std::fs::write(
            dir.dir.join(EXIT_FILE),
            r#"{"reason":1,"exit_code":0,"exited_at_unix_nanos":1,"error_code":"","error_message":""}"#,
        )
        .expect("write");
        assert_eq!(
            dir.read_exit().expect("read").map(|e| e.oom_killed),
            Some(false)
        );
        dir.write_exit(&exit).expect("write");
        assert_eq!(dir.read_acked(), 0);
        dir.write_acked(10).expect("ack");
        dir.write_acked(3).expect("ack");
        assert_eq!(dir.read_acked(), 10);
        journal.remove("r1");
        // A late ack for a forgotten run does not bring its directory back.
        dir.write_acked(20).expect("ack");
        assert!(!dir.dir.exists());
    }

    #[test]
    fn line_log_resumes_where_it_left_off_and_drops_a_torn_tail() {
        let state = tempfile::tempdir().expect("tempdir");
        let path = state.path().join("lines");
        {
            let (mut log, records, cursor) = LineLog::open(&path).expect("open");
            assert!(records.is_empty());
            assert_eq!(cursor, LineCursor::default());
            log.append(&[
                line(1, LogStream::Stdout, 5, "out1"),
                line(2, LogStream::Stderr, 5, "err1"),
            ])
            .expect("append");
            log.append(&[line(3, LogStream::Stdout, 10, "out2")])
                .expect("append");
        }
        // The agent died in the middle of the next append.
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(br#"{"seq":4,"stream":2,"ne"#)
            .expect("write");
        drop(file);

        let (mut log, records, cursor) = LineLog::open(&path).expect("reopen");
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(
            cursor,
            LineCursor {
                next_seq: 4,
                stdout_offset: 10,
                stderr_offset: 5
            }
        );
        log.append(&[line(4, LogStream::Stderr, 10, "err2")])
            .expect("append");
        let (_, records, cursor) = LineLog::open(&path).expect("reopen");
        assert_eq!(records.len(), 4);
        assert_eq!(records[3].msg, "err2");
        assert_eq!(cursor.next_seq, 5);
        assert_eq!(cursor.offset(LogStream::Stderr), 10);

        // Torn inside a binary record: its header only, then half its payload.
        let whole = std::fs::read(&path).expect("read");
        let mut more = Vec::new();
        encode_record(&mut more, &line(5, LogStream::Stdout, 20, "out3 ünïcode"));
        for cut in [3, more.len() - 4] {
            std::fs::write(&path, [&whole[..], &more[..cut]].concat()).expect("write");
            let (_, records, cursor) = LineLog::open(&path).expect("reopen");
            assert_eq!(records.len(), 4, "cut at {cut}");
            assert_eq!(cursor.next_seq, 5);
            assert_eq!(std::fs::read(&path).expect("read"), whole, "cut at {cut}");
        }
    }

    /// A run adopted from an older agent has JSON records; the new agent appends binary ones
    /// after them, and both read back, the marker flag included.
    #[test]
    fn line_log_reads_json_records_of_an_older_agent_followed_by_binary_ones() {
        let state = tempfile::tempdir().expect("tempdir");
        let path = state.path().join("lines");
        let old = [
            line(1, LogStream::Stdout, 5, "out1"),
            line(2, LogStream::Stderr, 7, "{\"looks\": \"like json\"}"),
        ];
        let mut json = Vec::new();
        for record in &old {
            serde_json::to_writer(&mut json, record).expect("json");
            json.push(b'\n');
        }
        std::fs::write(&path, json).expect("write");
        let (mut log, records, _) = LineLog::open(&path).expect("open");
        assert_eq!(records, old);
        let mut marker = line(
            4,
            LogStream::Stderr,
            7,
            "[berth] log limit of 10 lines reached",
        );
        marker.marker = true;
        let new = [line(3, LogStream::Stdout, 9, ""), marker];
        log.append(&new).expect("append");
        let (_, records, cursor) = LineLog::open(&path).expect("reopen");
        assert_eq!(records, [&old[..], &new[..]].concat());
        assert_eq!(cursor.next_seq, 5);
        assert_eq!(cursor.offset(LogStream::Stdout), 9);
    }
}
