//! The etcd [`Store`]: the multi-machine backend. Every key lives under a configurable prefix
//! (`/berth/` by default), the trait's per-key `mod_revision`/`create_revision` are etcd's own,
//! and the store revision is etcd's cluster revision.
//!
//! Each [`Txn`] becomes one etcd `Txn`: its preconditions become `Compare`s, its writes the
//! success branch, and the failure branch reads back the keys under a precondition so a
//! [`StoreError::Conflict`] can name the key and the revision found, as the other backends do.
//!
//! Writes go through one writer task fed by a channel, so [`Store::submit`] fixes the commit
//! order when it is called. The task group-commits what is queued behind the transaction it
//! sends, as one etcd request, while that is safe: up to [`EtcdConfig::max_txn_ops`]
//! operations and [`EtcdConfig::max_request_bytes`] bytes, with pairwise disjoint keys (so
//! the revision a write returns is still the revision of the value it wrote, and later
//! preconditions on it mean what they say). If a merged request fails on a precondition,
//! nothing of it applied, and its
//! transactions are sent again one by one, in order, so only those whose own preconditions do
//! not hold fail. Merged transactions share one etcd revision (a transaction is never split,
//! so each still sees one revision for all its keys). A single transaction larger than those
//! limits cannot be atomic in etcd and fails with [`StoreError::Backend`] before anything is
//! sent. Several writes to one key inside a transaction are sent as the last of them (etcd
//! refuses duplicates); the one difference this leaves is that a delete followed by a put
//! keeps the key's old `create_revision` in etcd.
//!
//! Failures: the client connects to every endpoint in the list and balances across them. Reads
//! are idempotent and are retried with exponential backoff on transport errors and on
//! `Unavailable`/`DeadlineExceeded`, so a member failure is ridden out as long as a quorum
//! remains. Unfenced writes are *not* retried: a transport error during a commit surfaces as
//! [`StoreError::Backend`] and the outcome is unknown (the write may or may not have applied);
//! the caller re-reads and decides, exactly as after a [`StoreError::Conflict`].
//!
//! Fenced writes (a leader's, after [`EtcdStore::set_fence`]): every request also compares the
//! leader key's creation revision (a deposed leader's writes fail with [`StoreError::Fenced`])
//! and compares-and-increments a per-term writer sequence key, `writers/<term>`, on the
//! leader's lease. After a transport error the task reads that key: moved means applied, not
//! moved means resend (a late original and the resend cannot both apply: each compares the
//! sequence). So a leader's write applies exactly once through member failures, and fails only
//! if etcd stays unreachable for [`EtcdConfig::request_timeout`]. One operation of each
//! request is the sequence: a transaction may hold `max_txn_ops - 1` operations.
//!
//! Expiring puts attach their key to a lease shared per TTL and time bucket (see `leases`).

mod leases;
mod members;

pub use members::Members;

use super::{check, Expect, KeyValue, Op, Store, StoreError, Txn};
use backon::{ExponentialBuilder, Retryable};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, SortOrder, SortTarget,
    TxnOp, TxnOpResponse,
};
use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How to reach etcd and how big one request may be.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://10.0.0.1:2379`; the client balances across them.
    pub endpoints: Vec<String>,
    /// Prepended to every key; keeps Berth's keys apart from anything else in the cluster.
    pub prefix: String,
    /// The server's `--max-txn-ops` (etcd's default is 128).
    pub max_txn_ops: usize,
    /// Bytes per request as `request_bytes` counts them (keys, values, compares, framing);
    /// below etcd's default 1.5 MiB request limit.
    pub max_request_bytes: usize,
    /// How long a write is tried in all (across attempts and members) before it fails.
    pub request_timeout: Duration,
    /// How long one request may wait for its answer before it is given up and retried (a
    /// write's outcome is then resolved through the writer sequence). A member that stops
    /// answering — frozen, or cut off — keeps its connection, so the client keeps sending a
    /// share of the requests to it; this bounds what each of them costs.
    pub attempt_timeout: Duration,
    /// How many times a read is retried after a transient failure.
    pub read_retries: usize,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.to_owned(),
            max_txn_ops: 128,
            // Leave room under 1.5 MiB for the request's framing and compares.
            max_request_bytes: 1536 * 1024 - 64 * 1024,
            request_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(2),
            // About 10 s of backoff in all: longer than an etcd leader election under load.
            read_retries: 10,
        }
    }
}

pub const DEFAULT_PREFIX: &str = "/berth/";

#[derive(Clone)]
pub struct EtcdStore {
    members: std::sync::Arc<Members>,
    prefix: String,
    max_ops: usize,
    max_bytes: usize,
    read_retries: usize,
    writer: mpsc::UnboundedSender<PendingCommit>,
    fence: SharedFence,
}

/// The leadership every write must still hold: the election key a leader owns and the etcd
/// revision that created it. Once set, each etcd transaction also compares the key's
/// `create_revision`, so after the key is gone (the leader's lease expired, or it resigned) or
/// was re-created by another leader, no write of this store applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The full etcd key (not under the store's prefix rules; election keys are absolute).
    pub key: Vec<u8>,
    pub create_revision: i64,
    /// The leader's lease (0: none); the writer sequence key is attached to it.
    pub lease: i64,
}

type SharedFence = std::sync::Arc<std::sync::RwLock<Option<Fence>>>;

struct PendingCommit {
    txn: Txn,
    reply: oneshot::Sender<Result<u64, StoreError>>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Whether a failed call may be repeated: the request never reached a leader, timed out, or
/// lost its connection (a member killed mid-request answers `Cancelled`). For a write the
/// outcome is then unknown, which the writer sequence resolves.
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
        ),
        _ => false,
    }
}

fn read_backoff(retries: usize) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(retries)
        .with_jitter()
}

fn revision(r: i64) -> Result<u64, StoreError> {
    u64::try_from(r).map_err(|_| backend(format!("etcd returned negative revision {r}")))
}

impl EtcdStore {
    /// Prepares one client per member (see [`Members`]; connections open on first use) and
    /// starts the writer task. Must be called inside a tokio runtime.
    pub async fn connect(config: EtcdConfig) -> Result<EtcdStore, StoreError> {
        if config.endpoints.is_empty() {
            return Err(backend("no etcd endpoints given"));
        }
        let attempt = config.attempt_timeout.min(config.request_timeout);
        let options = ConnectOptions::new()
            .with_connect_timeout(attempt)
            .with_timeout(attempt);
        let members = std::sync::Arc::new(
            Members::connect(&config.endpoints, &options)
                .await
                .map_err(backend)?,
        );
        let (writer, queue) = mpsc::unbounded_channel();
        let fence = SharedFence::default();
        // One operation of each request is the writer sequence (fenced writers).
        let max_ops = config.max_txn_ops.max(2) - 1;
        let task = WriterTask {
            members: members.clone(),
            prefix: config.prefix.clone(),
            max_ops,
            max_bytes: config.max_request_bytes,
            fence: fence.clone(),
            seq: None,
            write_deadline: config.request_timeout,
            leases: leases::LeaseCache::new(members.clone()),
        };
        tokio::spawn(task.run(queue));
        Ok(EtcdStore {
            members,
            max_ops,
            max_bytes: config.max_request_bytes,
            prefix: config.prefix,
            read_retries: config.read_retries,
            writer,
            fence,
        })
    }

    /// From now on every write also requires `fence` to hold (see [`Fence`]); writes already
    /// queued are checked too. A fence is never lifted: a process that loses leadership stops.
    pub fn set_fence(&self, fence: Fence) {
        let mut slot = self
            .fence
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *slot = Some(fence);
    }

    /// The client of the member this store uses now.
    pub fn client(&self) -> Client {
        self.members.current().1
    }

    /// The members' clients, with a cursor of its own (elections share the connections).
    pub fn members(&self) -> Members {
        self.members.fork()
    }

    /// The key prefix every store key is written under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `[start, end)` in `order`, at most `limit` keys, in pages at one revision: an ascending
    /// page starts just after the last key the one before read, a descending one ends there.
    async fn paged_range(
        &self,
        start: &str,
        end: &str,
        limit: usize,
        order: SortOrder,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if start >= end || limit == 0 {
            return Ok(vec![]);
        }
        let (mut from, mut to) = (self.full_key(start), self.full_key(end));
        let mut out = Vec::new();
        let mut page = RANGE_PAGE;
        let mut at_revision = None;
        loop {
            let want = page.min(limit - out.len());
            let mut options = GetOptions::new()
                .with_range(to.clone())
                .with_limit(i64::try_from(want).unwrap_or(i64::MAX))
                .with_sort(SortTarget::Key, order);
            if let Some(rev) = at_revision {
                options = options.with_revision(rev);
            }
            let response = match self.read_raw(from.clone(), Some(options)).await {
                Ok(r) => r,
                Err(e) if too_large(&e) && page > 1 => {
                    page = (page / 2).max(1);
                    continue;
                }
                Err(e) => return Err(backend(e)),
            };
            if at_revision.is_none() {
                at_revision = response.header().map(|h| h.revision());
            }
            let kvs = response.kvs();
            for kv in kvs {
                out.push(self.decode(kv)?);
            }
            let more = response.more() && kvs.len() == want;
            match kvs.last() {
                Some(last) if more && out.len() < limit => {
                    let mut key = last.key().to_vec();
                    if order == SortOrder::Descend {
                        to = String::from_utf8(key).map_err(backend)?;
                    } else {
                        key.push(0);
                        from = String::from_utf8(key).map_err(backend)?;
                    }
                }
                _ => return Ok(out),
            }
        }
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn decode(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        let key = kv.key_str().map_err(backend)?;
        let key = key
            .strip_prefix(self.prefix.as_str())
            .ok_or_else(|| backend(format!("etcd returned key {key} outside the prefix")))?;
        Ok(KeyValue {
            key: key.to_owned(),
            value: kv.value().to_vec(),
            mod_revision: revision(kv.mod_revision())?,
            create_revision: revision(kv.create_revision())?,
        })
    }

    /// One idempotent range read, retried across transient failures.
    async fn read(
        &self,
        key: String,
        options: Option<GetOptions>,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let response = self.read_raw(key, options).await.map_err(backend)?;
        response.kvs().iter().map(|kv| self.decode(kv)).collect()
    }

    /// One range request, retried across transient failures; the etcd error is kept so a
    /// caller can tell a response too large for the client.
    async fn read_raw(
        &self,
        key: String,
        options: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, etcd_client::Error> {
        (|| {
            self.members.call(|client| {
                let (key, options) = (key.clone(), options.clone());
                async move { client.kv_client().get(key, options).await }
            })
        })
        .retry(read_backoff(self.read_retries))
        .when(transient)
        .notify(|e, after| {
            tracing::warn!(error = %e, retry_in_ms = after.as_millis() as u64, "etcd read failed");
        })
        .await
    }
}

/// Keys per range request at first; halved while a response is too large for the client's
/// 4 MiB message limit (large values, e.g. log chunks), so a range of any size is read.
const RANGE_PAGE: usize = 1000;

/// The answer was larger than a gRPC message may be.
fn too_large(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::OutOfRange || s.message().contains("message length too large")
        }
        _ => false,
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self
            .read(self.full_key(key), None)
            .await?
            .into_iter()
            .next())
    }

    /// Read in pages (etcd's response must fit one gRPC message: a single range over 100,000
    /// runs is ~140 MB), every page at the first page's revision, so the whole range is one
    /// consistent snapshot, as one request would be.
    async fn range(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.paged_range(start, end, limit, SortOrder::Ascend).await
    }

    /// As [`EtcdStore::range`], backwards. etcd sorts a descending range on the server before
    /// it applies the limit, so a page costs the server the keys below the cursor, and the
    /// client only the page.
    async fn range_rev(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.paged_range(start, end, limit, SortOrder::Descend)
            .await
    }

    fn max_txn_ops(&self) -> usize {
        self.max_ops
    }

    fn max_txn_bytes(&self) -> usize {
        self.max_bytes
    }

    fn op_bytes(&self, key: &str, value_len: Option<usize>, expect: Expect) -> usize {
        request_bytes(&self.prefix, key, value_len, expect)
    }

    fn submit(&self, txn: Txn) -> impl Future<Output = Result<u64, StoreError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let queued = self.writer.send(PendingCommit { txn, reply });
        async move {
            queued.map_err(|_| backend("etcd writer task stopped"))?;
            answer
                .await
                .map_err(|_| backend("etcd writer task stopped"))?
        }
    }
}

/// The single writer: owns the commit order.
struct WriterTask {
    members: std::sync::Arc<Members>,
    prefix: String,
    max_ops: usize,
    max_bytes: usize,
    fence: SharedFence,
    seq: Option<WriterSeq>,
    /// How long a fenced write keeps trying to learn its outcome while etcd is unreachable.
    write_deadline: Duration,
    leases: leases::LeaseCache,
}

fn op_key(op: &Op) -> &str {
    let (Op::Put { key, .. } | Op::Delete { key, .. }) = op;
    key
}

fn op_expect(op: &Op) -> Expect {
    let (Op::Put { expect, .. } | Op::Delete { expect, .. }) = op;
    *expect
}

/// What one operation adds to the etcd request that carries it, at most: its key (with the
/// prefix) and value with their protobuf framing and lease, and for a precondition its
/// compares (two for a revision) and the read of the key in the failure branch. The request
/// limit is on the whole encoded request: counting keys and values alone let a merged request
/// of a few thousand small writes pass the check and then be refused by etcd ("request is too
/// large"), which stops the scheduler.
fn request_bytes(prefix: &str, key: &str, value_len: Option<usize>, expect: Expect) -> usize {
    // Tags, length varints and the lease id of a put; a compare's result, target and revision.
    const OP_FRAMING: usize = 32;
    const COMPARE_FRAMING: usize = 32;
    const READ_FRAMING: usize = 16;
    let key_len = prefix.len() + key.len();
    let op = key_len + value_len.unwrap_or(0) + OP_FRAMING;
    let compares = match expect {
        Expect::Any => 0,
        Expect::Absent => 1,
        Expect::Revision(_) => 2,
    };
    let read_back = if compares > 0 {
        key_len + READ_FRAMING
    } else {
        0
    };
    op + compares * (key_len + COMPARE_FRAMING) + read_back
}

fn txn_bytes(prefix: &str, txn: &Txn) -> usize {
    txn.ops
        .iter()
        .map(|op| match op {
            Op::Put {
                key, value, expect, ..
            } => request_bytes(prefix, key, Some(value.len()), *expect),
            Op::Delete { key, expect } => request_bytes(prefix, key, None, *expect),
        })
        .sum()
}

impl WriterTask {
    async fn run(mut self, mut queue: mpsc::UnboundedReceiver<PendingCommit>) {
        let mut carried: Option<PendingCommit> = None;
        loop {
            let first = match carried.take() {
                Some(p) => p,
                None => match queue.recv().await {
                    Some(p) => p,
                    None => return,
                },
            };
            if let Err(e) = self.fits(&first.txn) {
                let _ = first.reply.send(Err(e));
                continue;
            }
            // Gather the transactions queued behind it while they merge safely: within etcd's
            // limits, and touching no key of the group (each write's revision must stay the
            // revision of the value it wrote).
            let mut keys: HashSet<String> = first
                .txn
                .ops
                .iter()
                .map(|op| op_key(op).to_owned())
                .collect();
            let mut ops = first.txn.ops.len();
            let mut bytes = txn_bytes(&self.prefix, &first.txn);
            let mut group = vec![first];
            while let Ok(next) = queue.try_recv() {
                let n = &next.txn;
                let mergeable = self.fits(n).is_ok()
                    && ops + n.ops.len() <= self.max_ops
                    && bytes + txn_bytes(&self.prefix, n) <= self.max_bytes
                    && n.ops.iter().all(|op| !keys.contains(op_key(op)));
                if !mergeable {
                    carried = Some(next);
                    break;
                }
                keys.extend(n.ops.iter().map(|op| op_key(op).to_owned()));
                ops += n.ops.len();
                bytes += txn_bytes(&self.prefix, n);
                group.push(next);
            }
            if group.len() == 1 {
                for pending in group {
                    let result = self.commit_one(&pending.txn).await;
                    let _ = pending.reply.send(result);
                }
                continue;
            }
            let merged = Txn {
                ops: group.iter().flat_map(|p| p.txn.ops.clone()).collect(),
            };
            match self.commit_one(&merged).await {
                // A precondition of one of them failed, so none applied: apply them one by
                // one, in order, so only those whose own preconditions fail do fail.
                Err(StoreError::Conflict { .. }) => {
                    for pending in group {
                        let result = self.commit_one(&pending.txn).await;
                        let _ = pending.reply.send(result);
                    }
                }
                result => {
                    for pending in group {
                        let _ = pending.reply.send(match &result {
                            Ok(rev) => Ok(*rev),
                            Err(StoreError::Fenced(why)) => Err(StoreError::Fenced(why.clone())),
                            Err(e) => Err(backend(e)),
                        });
                    }
                }
            }
        }
    }

    fn fits(&self, txn: &Txn) -> Result<(), StoreError> {
        if txn.ops.len() > self.max_ops {
            return Err(backend(format!(
                "transaction of {} operations exceeds etcd's limit of {} per request",
                txn.ops.len(),
                self.max_ops
            )));
        }
        if txn_bytes(&self.prefix, txn) > self.max_bytes {
            return Err(backend(format!(
                "transaction of {} bytes exceeds the etcd request limit of {} bytes",
                txn_bytes(&self.prefix, txn),
                self.max_bytes
            )));
        }
        Ok(())
    }

    /// Sends `txn` as one etcd transaction. Unfenced, it is not retried (see the module doc).
    /// Fenced, a transport failure is resolved through the writer sequence (see
    /// [`WriterSeq`]): the write is applied exactly once or reported failed, never unknown.
    async fn commit_one(&mut self, txn: &Txn) -> Result<u64, StoreError> {
        let full = |key: &str| format!("{}{key}", self.prefix);
        let mut compares = Vec::new();
        let mut checked = Vec::new();
        for op in &txn.ops {
            let key = full(op_key(op));
            match op_expect(op) {
                Expect::Any => continue,
                Expect::Absent => compares.push(Compare::version(key.clone(), CompareOp::Equal, 0)),
                Expect::Revision(r) => {
                    let r = i64::try_from(r).map_err(backend)?;
                    compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, r));
                    // A missing key has mod revision 0; make `Revision(0)` fail on it too.
                    compares.push(Compare::version(key.clone(), CompareOp::Greater, 0));
                }
            }
            checked.push((op_key(op).to_owned(), op_expect(op), key));
        }
        // etcd refuses a transaction that writes one key twice; the last write decides the
        // key's state anyway, so send only that one.
        let mut seen = HashSet::new();
        let mut last_writes: Vec<&Op> = txn
            .ops
            .iter()
            .rev()
            .filter(|op| seen.insert(op_key(op)))
            .collect();
        last_writes.reverse();
        let leases = self.leases.for_txn(txn).await?;
        let mut writes: Vec<TxnOp> = last_writes
            .into_iter()
            .map(|op| match op {
                Op::Put {
                    key, value, ttl, ..
                } => TxnOp::put(full(key), value.clone(), leases::put_options(&leases, *ttl)),
                Op::Delete { key, .. } => TxnOp::delete(full(key), None),
            })
            .collect();
        let mut reads: Vec<TxnOp> = checked
            .iter()
            .map(|(_, _, key)| TxnOp::get(key.clone(), None))
            .collect();
        let fence = self
            .fence
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        if let Some(f) = &fence {
            compares.push(Compare::create_revision(
                f.key.clone(),
                CompareOp::Equal,
                f.create_revision,
            ));
            reads.push(TxnOp::get(f.key.clone(), None));
            let seq = self.seq_for(f);
            compares.push(seq.expect_current());
            writes.push(seq.put_next());
            reads.push(TxnOp::get(seq.key.clone(), None));
        }
        let request = etcd_client::Txn::new()
            .when(compares)
            .and_then(writes)
            .or_else(reads);
        let deadline = tokio::time::Instant::now() + self.write_deadline;
        let response = loop {
            let attempt = self.members.call(|client| {
                let request = request.clone();
                async move { client.kv_client().txn(request).await }
            });
            let e = match attempt.await {
                Ok(response) => break response,
                Err(e) => e,
            };
            if leases::lease_gone(&e) {
                self.leases.forget();
            }
            let Some(seq) = self
                .seq
                .as_ref()
                .filter(|_| fence.is_some() && transient(&e))
            else {
                tracing::warn!(error = %e, "etcd commit failed; its outcome is unknown");
                return Err(backend(e));
            };
            tracing::warn!(error = %e, "etcd commit failed; reading the writer sequence");
            match self.resolve(seq, deadline).await? {
                Resolved::Applied(rev) => {
                    self.advance();
                    return Ok(rev);
                }
                Resolved::NotApplied if tokio::time::Instant::now() < deadline => continue,
                Resolved::NotApplied => {
                    return Err(backend(
                        "etcd stayed unreachable; the write was not applied",
                    ))
                }
            }
        };
        let rev = revision(
            response
                .header()
                .ok_or_else(|| backend("etcd response without header"))?
                .revision(),
        )?;
        if response.succeeded() {
            if fence.is_some() {
                self.advance();
            }
            return Ok(rev);
        }
        let found = response.op_responses();
        // Leadership first: a deposed leader's conflicts are not worth reporting.
        if let Some(f) = &fence {
            let n = found.len();
            let get = |i: usize| match found.get(i) {
                Some(TxnOpResponse::Get(g)) => Ok(g.kvs().first().cloned()),
                _ => Err(backend("etcd answered a read with another operation")),
            };
            let holder = get(n.wrapping_sub(2))?.map(|kv| kv.create_revision());
            if holder != Some(f.create_revision) {
                tracing::warn!(
                    fence_revision = f.create_revision,
                    holder_revision = ?holder,
                    "write refused: this scheduler no longer holds the leadership"
                );
                return Err(StoreError::Fenced(format!(
                    "leader key created at revision {} is {}",
                    f.create_revision,
                    match holder {
                        Some(r) => format!("now held at revision {r}"),
                        None => "gone".to_owned(),
                    }
                )));
            }
            // An earlier attempt of this very transaction applied after all (it was still in
            // flight when the sequence was read): this attempt's compare saw it.
            if let Some(seq) = &self.seq {
                let current = get(n - 1)?;
                if seq.applied_in(current.as_ref()) {
                    let rev = match current {
                        Some(kv) => revision(kv.mod_revision())?,
                        None => rev,
                    };
                    self.advance();
                    return Ok(rev);
                }
            }
        }
        // Name the first precondition that did not hold, from the state etcd compared against.
        for ((key, expect, _), answer) in checked.iter().zip(found.iter()) {
            let current = match answer {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| revision(kv.mod_revision()))
                    .transpose()?,
                _ => return Err(backend("etcd answered a read with another operation")),
            };
            check(key, *expect, current)?;
        }
        Err(backend(
            "etcd rejected a transaction whose preconditions hold",
        ))
    }

    /// The sequence for `fence`'s term (a new leader key starts a new sequence at 0).
    fn seq_for(&mut self, fence: &Fence) -> WriterSeq {
        let key = format!("{}writers/{}", self.prefix, fence.create_revision);
        match &self.seq {
            Some(seq) if seq.key == key => seq.clone(),
            _ => {
                let seq = WriterSeq {
                    key,
                    applied: 0,
                    lease: fence.lease,
                };
                self.seq = Some(seq.clone());
                seq
            }
        }
    }

    fn advance(&mut self) {
        if let Some(seq) = &mut self.seq {
            seq.applied += 1;
        }
    }

    /// After a transport failure: reads the writer sequence (retrying until `deadline`) to
    /// learn whether the failed attempt applied.
    async fn resolve(
        &self,
        seq: &WriterSeq,
        deadline: tokio::time::Instant,
    ) -> Result<Resolved, StoreError> {
        let mut delay = Duration::from_millis(50);
        loop {
            let read = self.members.call(|client| {
                let key = seq.key.clone();
                async move { client.kv_client().get(key, None).await }
            });
            match read.await {
                Ok(r) => {
                    let current = r.kvs().first();
                    if seq.applied_in(current) {
                        let rev = current.map_or(0, etcd_client::KeyValue::mod_revision);
                        return Ok(Resolved::Applied(revision(rev)?));
                    }
                    if seq.unchanged_in(current) {
                        return Ok(Resolved::NotApplied);
                    }
                    return Err(StoreError::Fenced(format!(
                        "the writer sequence {} was changed by another writer",
                        seq.key
                    )));
                }
                Err(e) if transient(&e) && tokio::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "etcd unreachable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(backend(e)),
            }
        }
    }
}

enum Resolved {
    Applied(u64),
    NotApplied,
}

/// A fenced writer's count of applied requests, kept in etcd beside the data: every request
/// compares it and increments it. After a transport error the outcome of a write is unknown;
/// reading the count tells (applied: it moved; not applied: it did not, and a resend that
/// races a late original fails its compare, so the write still applies once). The key lives on
/// the leader's lease and goes with it.
#[derive(Debug, Clone)]
struct WriterSeq {
    key: String,
    applied: u64,
    lease: i64,
}

impl WriterSeq {
    fn encode(n: u64) -> Vec<u8> {
        n.to_string().into_bytes()
    }

    fn expect_current(&self) -> Compare {
        if self.applied == 0 {
            Compare::version(self.key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(
                self.key.clone(),
                CompareOp::Equal,
                Self::encode(self.applied),
            )
        }
    }

    fn put_next(&self) -> TxnOp {
        let options = (self.lease != 0).then(|| PutOptions::new().with_lease(self.lease));
        TxnOp::put(self.key.clone(), Self::encode(self.applied + 1), options)
    }

    fn applied_in(&self, current: Option<&etcd_client::KeyValue>) -> bool {
        current.is_some_and(|kv| kv.value() == Self::encode(self.applied + 1).as_slice())
    }

    fn unchanged_in(&self, current: Option<&etcd_client::KeyValue>) -> bool {
        match current {
            None => self.applied == 0,
            Some(kv) => kv.value() == Self::encode(self.applied).as_slice(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{EtcdConfig, EtcdStore};
    use crate::testkit::etcd::EtcdCluster;
    use std::time::{Duration, Instant};

    /// A private single-member etcd on loopback (all members killed on drop).
    fn spawn_etcd() -> EtcdCluster {
        spawn_cluster(1)
    }

    fn spawn_cluster(n: usize) -> EtcdCluster {
        EtcdCluster::start(n).expect(
            "start etcd on loopback (install Debian's etcd-server to run the etcd store tests; \
             deploy/test.sh does)",
        )
    }

    fn endpoint(etcd: &EtcdCluster) -> String {
        etcd.endpoints().into_iter().next().unwrap_or_default()
    }

    /// Waits until the member has a leader and serves a read.
    async fn healthy(store: &EtcdStore) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            use crate::store::Store;
            match store.get("health").await {
                Ok(_) => return,
                Err(e) if Instant::now() > deadline => panic!("etcd never became healthy: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conforms_against_a_real_etcd() {
        let etcd = spawn_etcd();
        let mut config = EtcdConfig::new(vec![endpoint(&etcd)]);
        config.prefix = "/berth-test/".to_owned();
        let store = EtcdStore::connect(config).await.expect("connect");
        healthy(&store).await;
        crate::store::conformance::run_all(&store).await;
        // The scheduler runs etcd under the sealing wrapper: check that pair too, in a fresh
        // keyspace of the same cluster.
        let mut config = EtcdConfig::new(vec![endpoint(&etcd)]);
        config.prefix = "/berth-sealed/".to_owned();
        let inner = EtcdStore::connect(config).await.expect("connect");
        let key = std::sync::Arc::new(crate::secrets::SecretKey::generate());
        let sealed = crate::store::SealedStore::new(inner, key, &["pg/", "tx/", "rg/", "so/"]);
        crate::store::conformance::run_all(&sealed).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rejects_a_transaction_etcd_cannot_apply_atomically() {
        use crate::store::{Expect, Store, StoreError, Txn};
        let etcd = spawn_etcd();
        let store = EtcdStore::connect(EtcdConfig::new(vec![endpoint(&etcd)]))
            .await
            .expect("connect");
        healthy(&store).await;
        let mut txn = Txn::new();
        for i in 0..129 {
            txn = txn.put(format!("big/{i:03}"), vec![], Expect::Any);
        }
        let result = store.commit(txn).await;
        assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
        assert!(
            store.list_prefix("big/").await.expect("list").is_empty(),
            "nothing of it was written"
        );
    }

    /// Many small preconditioned writes queued at once, with a server that takes thousands of
    /// operations per request: the writer merges them up to the request limit counted on the
    /// whole request (compares and read-backs included), so etcd accepts every merged request.
    /// Counting keys and values alone, merged requests reached ~2× the limit and etcd refused
    /// them ("request is too large"), which stopped a scheduler under load.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn merged_requests_stay_within_the_request_limit() {
        use crate::store::{Expect, Store, Txn};
        const OPS: usize = 8192;
        let options = crate::testkit::etcd::EtcdOptions {
            extra_args: vec![format!("--max-txn-ops={OPS}")],
            ..Default::default()
        };
        let etcd = EtcdCluster::start_with(1, &options).expect("start etcd on loopback");
        let mut config = EtcdConfig::new(vec![endpoint(&etcd)]);
        config.max_txn_ops = OPS;
        let store = EtcdStore::connect(config).await.expect("connect");
        healthy(&store).await;
        // Long keys and small values, each created under a precondition: the request carries
        // each key three times (put, compare, read-back).
        let key = |i: usize| format!("merge/{}/{i:06}", "k".repeat(120));
        let pending: Vec<_> = (0..6000)
            .map(|i| store.submit(Txn::new().put(key(i), vec![7; 64], Expect::Absent)))
            .collect();
        for (i, done) in pending.into_iter().enumerate() {
            done.await
                .unwrap_or_else(|e| panic!("write {i} was not applied: {e}"));
        }
        let stored = store.list_prefix("merge/").await.expect("list");
        assert_eq!(stored.len(), 6000);
    }

    /// Killing the member the client may be talking to: reads ride it out through retries,
    /// and writes work again once the client has moved to a live member (a write that fails
    /// meanwhile surfaces as `StoreError::Backend`, never as a wrong answer).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn survives_the_loss_of_one_member() {
        use crate::store::{Expect, Store, StoreError, Txn};
        let mut cluster = spawn_cluster(3);
        let endpoints = cluster.endpoints();
        let store = EtcdStore::connect(EtcdConfig::new(endpoints))
            .await
            .expect("connect");
        healthy(&store).await;
        let before = store
            .commit(Txn::new().put("fo/a", b"1".to_vec(), Expect::Absent))
            .await
            .expect("write with all members up");
        cluster.kill(0).expect("kill a member");
        let kv = store
            .get("fo/a")
            .await
            .expect("read after losing a member")
            .expect("present");
        assert_eq!(kv.mod_revision, before);
        let mut failures = 0;
        let after = loop {
            match store
                .commit(Txn::new().put("fo/a", b"2".to_vec(), Expect::Revision(before)))
                .await
            {
                Ok(rev) => break rev,
                Err(StoreError::Backend(e)) if failures < 20 => {
                    failures += 1;
                    tracing::info!(error = %e, "write failed while a member is down");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                // A Conflict here would mean an earlier failed attempt did apply: the write's
                // outcome was unknown, exactly as documented.
                Err(StoreError::Conflict { found, .. }) => break found.expect("written"),
                Err(e) => panic!("writes never recovered: {e}"),
            }
        };
        assert!(after > before);
        let kv = store.get("fo/a").await.expect("read").expect("present");
        assert_eq!(kv.value, b"2".to_vec());
    }

    /// Fencing: once another candidate leads, nothing the old leader sends applies — single
    /// or merged, with or without preconditions — and the old leader learns it lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deposed_leader_cannot_write() {
        use crate::store::{Election, ElectionConfig, Expect, Store, StoreError, Txn};
        let etcd = spawn_etcd();
        let connect = || EtcdStore::connect(EtcdConfig::new(vec![endpoint(&etcd)]));
        let (a, b) = (connect().await.expect("a"), connect().await.expect("b"));
        healthy(&a).await;
        let config = |value: &str| ElectionConfig {
            name: "leader".to_owned(),
            value: value.to_owned(),
            ttl: Duration::from_secs(2),
        };
        let ea = Election::start(&a, config("a")).await.expect("a joins");
        let la = ea.campaign().await.expect("a leads");
        a.set_fence(la.fence());
        a.commit(Txn::new().put("fx/k", b"a1".to_vec(), Expect::Absent))
            .await
            .expect("the leader writes");

        let eb = Election::start(&b, config("b")).await.expect("b joins");
        let standby = tokio::spawn(async move {
            let lb = eb.campaign().await;
            (eb, lb)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!standby.is_finished(), "b must wait while a leads");

        // a's lease ends behind its back (as when it is frozen past its TTL).
        b.client()
            .lease_client()
            .revoke(ea.lease_id())
            .await
            .expect("revoke a's lease");
        let (_eb, lb) = tokio::time::timeout(Duration::from_secs(10), standby)
            .await
            .expect("b takes over")
            .expect("join");
        let lb = lb.expect("b leads");
        b.set_fence(lb.fence());
        let kv = b.get("fx/k").await.expect("read").expect("present");
        b.commit(Txn::new().put("fx/k", b"b1".to_vec(), Expect::Revision(kv.mod_revision)))
            .await
            .expect("the new leader writes");

        // Every kind of write from a is refused as fenced, and changes nothing.
        let plain = a.submit(Txn::new().put("fx/p1", b"a".to_vec(), Expect::Any));
        let merged = a.submit(Txn::new().put("fx/p2", b"a".to_vec(), Expect::Any));
        let guarded = a.submit(Txn::new().delete("fx/k", Expect::Any).put(
            "fx/p3",
            b"a".to_vec(),
            Expect::Absent,
        ));
        for (name, result) in [
            ("plain", plain.await),
            ("merged", merged.await),
            ("guarded", guarded.await),
        ] {
            assert!(
                matches!(result, Err(StoreError::Fenced(_))),
                "{name}: {result:?}"
            );
        }
        let stored = b.list_prefix("fx/").await.expect("list");
        assert_eq!(stored.len(), 1, "{stored:?}");
        assert_eq!(stored[0].value, b"b1".to_vec());
        // a's keep-alive learns the lease is gone.
        tokio::time::timeout(Duration::from_secs(5), la.lost())
            .await
            .expect("a notices it lost the leadership");
    }

    /// A fenced leader writing through the loss of an etcd member: a write whose outcome the
    /// transport error left unknown is resolved through the writer sequence, so every write
    /// is applied exactly once (a double apply would fail its `Absent` precondition) and none
    /// is reported failed while a quorum remains.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fenced_writes_apply_exactly_once_across_a_member_loss() {
        use crate::store::{Election, ElectionConfig, Expect, Store, Txn};
        let mut cluster = spawn_cluster(3);
        let endpoints = cluster.endpoints();
        let store = EtcdStore::connect(EtcdConfig::new(endpoints))
            .await
            .expect("connect");
        healthy(&store).await;
        let election = Election::start(
            &store,
            ElectionConfig {
                name: "leader".to_owned(),
                value: "w".to_owned(),
                ttl: Duration::from_secs(5),
            },
        )
        .await
        .expect("join");
        let leadership = election.campaign().await.expect("lead");
        store.set_fence(leadership.fence());
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for i in 0..300 {
                    let txn = Txn::new().put(format!("xo/{i:04}"), b"v".to_vec(), Expect::Absent);
                    // Some transactions without preconditions too, so merging is exercised.
                    let merged = store.submit(Txn::new().put(
                        format!("xm/{i:04}"),
                        b"v".to_vec(),
                        Expect::Any,
                    ));
                    if let Err(e) = store.commit(txn).await {
                        failures.push(format!("xo/{i:04}: {e}"));
                    }
                    if let Err(e) = merged.await {
                        failures.push(format!("xm/{i:04}: {e}"));
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                failures
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.kill(0).expect("kill a member");
        let failures = tokio::time::timeout(Duration::from_secs(60), writer)
            .await
            .expect("the writes finish")
            .expect("join");
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(store.list_prefix("xo/").await.expect("list").len(), 300);
        assert_eq!(store.list_prefix("xm/").await.expect("list").len(), 300);
    }

    /// The etcd member in use freezes (SIGSTOP) mid-writes for longer than the whole write
    /// timeout: its connection stays open and the lease's keep-alive stream is on it. The Berth
    /// leader never loses its leadership (the unanswered keep-alive is reopened on another
    /// member) and every fenced write applies exactly once (the stuck request is given up after
    /// the attempt timeout, its outcome resolved, and the store moves to another member).
    /// (A frozen *Raft leader* is another matter: etcd 3.4.23 revokes, on resuming, the leases
    /// that expired by its own clock while it was frozen, so a freeze longer than the TTL ends
    /// the leadership there; the fence keeps that safe. See ARCHITECTURE.md.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_keeps_its_leadership_while_an_etcd_member_is_frozen() {
        use crate::store::{Election, ElectionConfig, Expect, LeaseState, Store, Txn};
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let cluster = spawn_cluster(3);
        let store = EtcdStore::connect(EtcdConfig::new(cluster.endpoints()))
            .await
            .expect("connect");
        healthy(&store).await;
        // A follower: the Raft leader is another matter (below).
        let frozen = (cluster.raft_leader().expect("a Raft leader") + 1) % 3;
        // The election's cursor starts at the store's.
        store.members.use_member(frozen);
        let election = Election::start(
            &store,
            ElectionConfig {
                name: "leader".to_owned(),
                value: "w".to_owned(),
                ttl: Duration::from_secs(3),
            },
        )
        .await
        .expect("join");
        let leadership = election.campaign().await.expect("lead");
        store.set_fence(leadership.fence());
        let seen = {
            let mut state = leadership.state();
            tokio::spawn(async move {
                let mut seen = vec![*state.borrow_and_update()];
                while state.changed().await.is_ok() {
                    seen.push(*state.borrow_and_update());
                    if seen.last() == Some(&LeaseState::Lost) {
                        break;
                    }
                }
                seen
            })
        };
        const WRITES: usize = 300;
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for i in 0..WRITES {
                    let key = format!("fz/{i:04}");
                    let txn = Txn::new().put(key.clone(), b"v".to_vec(), Expect::Absent);
                    if let Err(e) = store.commit(txn).await {
                        failures.push(format!("{key}: {e}"));
                    }
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
                failures
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            store.members.current().0,
            frozen,
            "the store uses the member"
        );
        cluster
            .signal(frozen, "STOP")
            .expect("freeze the member in use");
        // Longer than EtcdConfig's request timeout (10 s).
        tokio::time::sleep(Duration::from_secs(11)).await;
        cluster.signal(frozen, "CONT").expect("thaw it");
        let failures = tokio::time::timeout(Duration::from_secs(60), writer)
            .await
            .expect("the writes finish")
            .expect("join");
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(store.list_prefix("fz/").await.expect("list").len(), WRITES);
        let mut state = leadership.state();
        tokio::time::timeout(
            Duration::from_secs(10),
            state.wait_for(|s| *s == LeaseState::Confirmed),
        )
        .await
        .expect("the lease is confirmed again")
        .expect("state");
        election.withdraw().await;
        let seen = seen.await.expect("join");
        assert!(!seen.contains(&LeaseState::Lost), "{seen:?}");
        eprintln!("lease states while etcd member {frozen} was frozen: {seen:?}");
    }

    /// A range larger than one page, and one whose values add up to more than a gRPC message
    /// may carry (4 MiB): both read whole, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_ranges_larger_than_one_response() {
        use crate::store::{Expect, Store, Txn};
        let etcd = spawn_etcd();
        let store = EtcdStore::connect(EtcdConfig::new(vec![endpoint(&etcd)]))
            .await
            .expect("connect");
        healthy(&store).await;
        for chunk in 0..25 {
            let mut txn = Txn::new();
            for i in 0..100 {
                txn = txn.put(format!("many/{:05}", chunk * 100 + i), vec![1], Expect::Any);
            }
            store.commit(txn).await.expect("write");
        }
        let all = store.list_prefix("many/").await.expect("list");
        assert_eq!(all.len(), 2500);
        assert!(all.windows(2).all(|w| w[0].key < w[1].key), "in key order");
        let some = store
            .range("many/00990", "many/01500", 300)
            .await
            .expect("range with a limit");
        assert_eq!(some.len(), 300);
        assert_eq!(some[0].key, "many/00990");
        // Backwards across pages: every key once, from the end down.
        let back = store
            .range_rev("many/", "many/02400", 2000)
            .await
            .expect("a reverse range over pages");
        assert_eq!(back.len(), 2000);
        assert_eq!(back[0].key, "many/02399");
        assert_eq!(back[1999].key, "many/00400");
        assert!(back.windows(2).all(|w| w[0].key > w[1].key), "descending");
        // 24 values of 300 KiB: about 7 MiB in all.
        for i in 0..24 {
            store
                .commit(Txn::new().put(format!("big/{i:02}"), vec![7; 300 * 1024], Expect::Any))
                .await
                .expect("write");
        }
        let big = store.list_prefix("big/").await.expect("list big values");
        assert_eq!(big.len(), 24);
        assert!(big.iter().all(|kv| kv.value.len() == 300 * 1024));
    }
}
