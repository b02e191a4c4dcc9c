//! The embedded [`Store`]: one redb file, ACID, fsync'd before any commit is answered. The
//! default on a single machine; the scheduler is its only user (one process owns the file).
//!
//! Writes go through one writer thread that does *group commit*: it takes every transaction
//! waiting in its queue, applies them in order inside one redb write transaction (each with its
//! own revision, its preconditions checked against the state left by the ones before it, a
//! failed precondition skipping only that transaction), and makes them durable with one fsync.
//! Concurrent writers therefore share the cost of a disk flush instead of queueing for one each;
//! a lone writer sees the same latency as before.
//!
//! Expiring keys: a value with an expiry carries it in its header (flagged in the create
//! revision's top bit, which a revision never reaches, so values written before expiry existed
//! read as they are), and an index table lists them by expiry. An expired key is invisible to
//! reads and preconditions at once; every group commit, and the writer when idle for
//! [`SWEEP_INTERVAL`], deletes up to [`SWEEP_BATCH`] expired keys.

use super::{check, KeyValue, Op, Store, StoreError, Txn};
use redb::{Database, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Expiring keys by expiry: `{expires_at_unix_millis:020}/{key}`.
const EXPIRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("expiries");
const REVISION: &str = "revision";
/// Each value is stored behind a header of mod revision and create revision.
const HEADER: usize = 16;
/// Set in the stored create revision when the header goes on with 8 bytes of expiry (unix ms).
const EXPIRES_FLAG: u64 = 1 << 63;
/// The most expired keys one sweep deletes.
const SWEEP_BATCH: usize = 256;
/// How often an idle writer looks for expired keys.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

fn now_millis() -> u64 {
    u64::try_from(crate::now_unix_millis()).unwrap_or(0)
}

fn expiry_key(at: u64, key: &str) -> String {
    format!("{at:020}/{key}")
}

#[derive(Clone)]
pub struct EmbeddedStore {
    // Declared first so it drops first: the writer thread releases its handle to the database
    // before this one goes, and the file is closed when the last store handle is dropped.
    writer: Arc<Writer>,
    db: Arc<Database>,
}

/// The writer thread's queue; dropping it stops the thread and waits for it.
struct Writer {
    queue: Option<std::sync::mpsc::Sender<PendingCommit>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct PendingCommit {
    txn: Txn,
    reply: tokio::sync::oneshot::Sender<Result<u64, StoreError>>,
}

/// The most transactions one group commit takes.
const MAX_GROUP: usize = 1024;

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn u64_at(raw: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&raw[at..at + 8]);
    u64::from_le_bytes(b)
}

/// A stored value's header: its revisions and expiry, and where its body starts.
struct Header {
    mod_revision: u64,
    create_revision: u64,
    expires_at: Option<u64>,
    body_at: usize,
}

impl Header {
    fn read(key: &str, raw: &[u8]) -> Result<Header, StoreError> {
        let truncated = || backend(format!("value of {key} is truncated"));
        if raw.len() < HEADER {
            return Err(truncated());
        }
        let mod_revision = u64_at(raw, 0);
        let create = u64_at(raw, 8);
        if create & EXPIRES_FLAG == 0 {
            return Ok(Header {
                mod_revision,
                create_revision: create,
                expires_at: None,
                body_at: HEADER,
            });
        }
        if raw.len() < HEADER + 8 {
            return Err(truncated());
        }
        Ok(Header {
            mod_revision,
            create_revision: create & !EXPIRES_FLAG,
            expires_at: Some(u64_at(raw, HEADER)),
            body_at: HEADER + 8,
        })
    }

    /// Whether the value has expired by `now`.
    fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// A stored value and its expiry (unix ms), if it has one.
fn decode(key: &str, raw: &[u8]) -> Result<(KeyValue, Option<u64>), StoreError> {
    let header = Header::read(key, raw)?;
    let kv = KeyValue {
        key: key.to_owned(),
        value: raw[header.body_at..].to_vec(),
        mod_revision: header.mod_revision,
        create_revision: header.create_revision,
    };
    Ok((kv, header.expires_at))
}

/// The key's value unless it has expired by `now`.
fn decode_live(key: &str, raw: &[u8], now: u64) -> Result<Option<KeyValue>, StoreError> {
    let (kv, expires_at) = decode(key, raw)?;
    Ok(match expires_at {
        Some(at) if at <= now => None,
        _ => Some(kv),
    })
}

fn encode(
    mod_revision: u64,
    create_revision: u64,
    expires_at: Option<u64>,
    value: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 8 + value.len());
    out.extend_from_slice(&mod_revision.to_le_bytes());
    match expires_at {
        Some(at) => {
            out.extend_from_slice(&(create_revision | EXPIRES_FLAG).to_le_bytes());
            out.extend_from_slice(&at.to_le_bytes());
        }
        None => out.extend_from_slice(&create_revision.to_le_bytes()),
    }
    out.extend_from_slice(value);
    out
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(backend)?;
        }
        let db = Database::create(path).map_err(backend)?;
        let tx = db.begin_write().map_err(backend)?;
        {
            tx.open_table(KV).map_err(backend)?;
            tx.open_table(META).map_err(backend)?;
            tx.open_table(EXPIRIES).map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        let db = Arc::new(db);
        let (sender, queue) = std::sync::mpsc::channel();
        let writer_db = db.clone();
        let thread = std::thread::Builder::new()
            .name("berth-store-writer".to_owned())
            .spawn(move || write_loop(&writer_db, &queue))
            .map_err(backend)?;
        let writer = Arc::new(Writer {
            queue: Some(sender),
            thread: Some(thread),
        });
        Ok(EmbeddedStore { writer, db })
    }

    fn get_blocking(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let table = tx.open_table(KV).map_err(backend)?;
        let found = table.get(key).map_err(backend)?;
        match found {
            Some(v) => decode_live(key, v.value(), now_millis()),
            None => Ok(None),
        }
    }

    fn range_blocking(
        &self,
        start: &str,
        end: &str,
        limit: usize,
        descending: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if start >= end {
            return Ok(vec![]);
        }
        let tx = self.db.begin_read().map_err(backend)?;
        let table = tx.open_table(KV).map_err(backend)?;
        let now = now_millis();
        let mut out = Vec::new();
        let range = table.range(start..end).map_err(backend)?;
        let entries: Box<dyn Iterator<Item = _>> = if descending {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        for entry in entries {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(backend)?;
            if let Some(kv) = decode_live(k.value(), v.value(), now)? {
                out.push(kv);
            }
        }
        Ok(out)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(EmbeddedStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(this))
            .await
            .map_err(backend)?
    }
}

/// The writer thread: group commits until every handle to the store is gone.
fn write_loop(db: &Database, queue: &std::sync::mpsc::Receiver<PendingCommit>) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        let first = match queue.recv_timeout(SWEEP_INTERVAL) {
            Ok(first) => first,
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = sweep_when_due(db) {
                    tracing::warn!(error = %e, "deleting expired keys failed");
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let (txns, replies): (Vec<Txn>, Vec<_>) =
            group.into_iter().map(|p| (p.txn, p.reply)).unzip();
        match commit_group(db, txns) {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed");
                for reply in replies {
                    let _ = reply.send(Err(backend(&e)));
                }
            }
        }
    }
}

/// Deletes a batch of expired keys if there is any (an idle store does not write).
fn sweep_when_due(db: &Database) -> Result<(), StoreError> {
    let due = {
        let tx = db.begin_read().map_err(backend)?;
        let table = tx.open_table(EXPIRIES).map_err(backend)?;
        let first = table.first().map_err(backend)?;
        let end = expiry_key(now_millis().saturating_add(1), "");
        first.is_some_and(|(k, _)| k.value() < end.as_str())
    };
    if due {
        commit_group(db, Vec::new())?;
    }
    Ok(())
}

/// Deletes up to [`SWEEP_BATCH`] keys whose expiry has passed (a key re-written since with
/// another expiry, or none, only loses its stale index entry).
fn sweep(
    kv: &mut redb::Table<&str, &[u8]>,
    expiries: &mut redb::Table<&str, &[u8]>,
) -> Result<(), StoreError> {
    let now = now_millis();
    // Every index key of an expiry at or before `now` sorts below this one.
    let end = expiry_key(now.saturating_add(1), "");
    let due: Vec<String> = expiries
        .range(..end.as_str())
        .map_err(backend)?
        .take(SWEEP_BATCH)
        .map(|entry| entry.map(|(k, _)| k.value().to_owned()).map_err(backend))
        .collect::<Result<_, _>>()?;
    for index_key in due {
        expiries.remove(index_key.as_str()).map_err(backend)?;
        let Some((at, key)) = index_key.split_once('/') else {
            continue;
        };
        let expires_at = match kv.get(key).map_err(backend)? {
            Some(v) => decode(key, v.value())?.1,
            None => None,
        };
        if expires_at.is_some_and(|e| at.parse() == Ok(e)) {
            kv.remove(key).map_err(backend)?;
        }
    }
    Ok(())
}

/// Applies `txns` in order in one write transaction and commits it once. The outer error means
/// nothing was committed; the inner results are per transaction (a failed precondition there
/// leaves that transaction out and the others in).
fn commit_group(db: &Database, txns: Vec<Txn>) -> Result<Vec<Result<u64, StoreError>>, StoreError> {
    let tx = db.begin_write().map_err(backend)?;
    let mut results = Vec::with_capacity(txns.len());
    {
        let mut kv = tx.open_table(KV).map_err(backend)?;
        let mut meta = tx.open_table(META).map_err(backend)?;
        let mut expiries = tx.open_table(EXPIRIES).map_err(backend)?;
        let mut revision = meta
            .get(REVISION)
            .map_err(backend)?
            .map_or(0, |v| v.value());
        let now = now_millis();
        for txn in txns {
            results.push(apply_one(&mut kv, &mut expiries, &mut revision, now, txn)?);
        }
        meta.insert(REVISION, revision).map_err(backend)?;
        sweep(&mut kv, &mut expiries)?;
    }
    tx.commit().map_err(backend)?;
    Ok(results)
}

/// One transaction inside a group: preconditions first, then every op, at `revision + 1`. The
/// outer error is a backend failure (the whole group must be abandoned).
fn apply_one(
    kv: &mut redb::Table<&str, &[u8]>,
    expiries: &mut redb::Table<&str, &[u8]>,
    revision: &mut u64,
    now: u64,
    txn: Txn,
) -> Result<Result<u64, StoreError>, StoreError> {
    let mut created = Vec::with_capacity(txn.ops.len());
    for op in &txn.ops {
        let (Op::Put { key, expect, .. } | Op::Delete { key, expect }) = op;
        if matches!(op, Op::Delete { .. }) && *expect == super::Expect::Any {
            // Nothing to check, and a deletion keeps no create revision.
            created.push(None);
            continue;
        }
        // Only the header is read: the value itself is not copied.
        let existing = match kv.get(key.as_str()).map_err(backend)? {
            Some(v) => Some(Header::read(key, v.value())?).filter(|h| !h.expired(now)),
            None => None,
        };
        if let Err(conflict) = check(key, *expect, existing.as_ref().map(|e| e.mod_revision)) {
            return Ok(Err(conflict));
        }
        created.push(existing.map(|e| e.create_revision));
    }
    if txn.ops.is_empty() {
        return Ok(Ok(*revision));
    }
    let rev = *revision + 1;
    for (op, create) in txn.ops.into_iter().zip(created) {
        match op {
            Op::Put {
                key, value, ttl, ..
            } => {
                let create = create.unwrap_or(rev);
                let expires_at = ttl.map(|ttl| {
                    now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
                });
                if let Some(at) = expires_at {
                    expiries
                        .insert(expiry_key(at, &key).as_str(), [].as_slice())
                        .map_err(backend)?;
                }
                kv.insert(
                    key.as_str(),
                    encode(rev, create, expires_at, &value).as_slice(),
                )
                .map_err(backend)?;
            }
            Op::Delete { key, .. } => {
                kv.remove(key.as_str()).map_err(backend)?;
            }
        }
    }
    *revision = rev;
    Ok(Ok(rev))
}

impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.blocking(move |s| s.get_blocking(&key)).await
    }

    async fn range(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let (start, end) = (start.to_owned(), end.to_owned());
        self.blocking(move |s| s.range_blocking(&start, &end, limit, false))
            .await
    }

    async fn range_rev(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let (start, end) = (start.to_owned(), end.to_owned());
        self.blocking(move |s| s.range_blocking(&start, &end, limit, true))
            .await
    }

    fn submit(
        &self,
        txn: Txn,
    ) -> impl std::future::Future<Output = Result<u64, StoreError>> + Send + 'static {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queued = match self.writer.queue.as_ref() {
            Some(queue) => queue
                .send(PendingCommit { txn, reply })
                .map_err(|_| backend("the store writer has stopped")),
            None => Err(backend("the store is closing")),
        };
        async move {
            queued?;
            answer
                .await
                .map_err(|_| backend("the store writer dropped a commit"))?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Expect, StoreError};

    #[tokio::test]
    async fn conforms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(&dir.path().join("state.redb")).expect("open");
        crate::store::conformance::run_all(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_are_grouped_but_stay_all_or_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(&dir.path().join("state.redb")).expect("open");
        store
            .commit(Txn::new().put("g/taken", b"x".to_vec(), Expect::Any))
            .await
            .expect("seed");
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                // Every tenth transaction fails its precondition on its second op.
                let second = if i % 10 == 0 { "g/taken" } else { "g/free" };
                let txn = Txn::new()
                    .put(
                        format!("g/{i:03}"),
                        i.to_le_bytes().to_vec(),
                        Expect::Absent,
                    )
                    .put(
                        second,
                        vec![],
                        if i % 10 == 0 {
                            Expect::Absent
                        } else {
                            Expect::Any
                        },
                    );
                store.commit(txn).await
            }));
        }
        let mut revisions = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            let result = t.await.expect("join");
            if i % 10 == 0 {
                assert!(
                    matches!(result, Err(StoreError::Conflict { .. })),
                    "txn {i}"
                );
                let key = format!("g/{i:03}");
                assert!(
                    store.get(&key).await.expect("get").is_none(),
                    "no partial txn {i}"
                );
            } else {
                revisions.push(result.expect("commit"));
            }
        }
        revisions.sort_unstable();
        revisions.dedup();
        assert_eq!(
            revisions.len(),
            180,
            "each transaction has its own revision"
        );
        let keys = store.list_prefix("g/").await.expect("list");
        assert_eq!(keys.len(), 180 + 2);
    }

    #[tokio::test]
    async fn survives_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        let rev = {
            let store = EmbeddedStore::open(&path).expect("open");
            store
                .commit(Txn::new().put("a", b"1".to_vec(), Expect::Absent))
                .await
                .expect("commit")
        };
        let store = EmbeddedStore::open(&path).expect("reopen");
        let kv = store.get("a").await.expect("get").expect("present");
        assert_eq!((kv.value, kv.mod_revision), (b"1".to_vec(), rev));
        let next = store
            .commit(Txn::new().put("b", b"2".to_vec(), Expect::Any))
            .await
            .expect("commit");
        assert_eq!(next, rev + 1, "the revision counter survives a restart");
    }
}
