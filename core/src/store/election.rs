//! Leadership among several schedulers over one etcd cluster, through etcd's election API on a
//! lease.
//!
//! Each candidate grants itself a lease of [`ElectionConfig::ttl`] and campaigns under one
//! election name with that lease; etcd makes the candidate whose key is oldest the leader and
//! makes the others wait. The candidate keeps its lease alive every `ttl / 6`. Leadership ends
//! when the leader resigns (its key is deleted: the next candidate is leader within one etcd
//! round trip), or when its lease expires because it died, froze or lost etcd: etcd deletes the
//! key at most `ttl` after the last keep-alive it received (plus its lease checker's period,
//! 500 ms), and the next candidate's campaign returns.
//!
//! The leader key's creation revision is the [`Fence`] its writes carry (see
//! [`EtcdStore::set_fence`]): safety does not depend on clocks. A leader also watches its own
//! lease ([`LeaseState`]): when no keep-alive has been answered for `ttl` (counted from when
//! it was sent, so always before etcd could have expired the lease) it is *unconfirmed*: the
//! process must stop serving, because another candidate may lead by now. That happens on an
//! ordinary etcd leader election (1–2 s with etcd's defaults, longer on a loaded machine), so
//! it is not the end: when a keep-alive is answered again the lease never ended (a lease etcd
//! lets expire is gone for good, and the leader key went with it), nobody else led meanwhile,
//! and the leader resumes with its state intact. The lease is *lost* when etcd says it is gone
//! or after `3 × ttl` without an answer (an etcd election under load took 4.6 s here with
//! `ttl` 3 s); then [`Leadership::lost`] resolves and the process must stop acting (its
//! agents move on to the new leader).
//!
//! A keep-alive stream whose member stops answering (frozen, or cut off) is given up after two
//! keep-alive periods and reopened on the next member (see [`Members`]).

use super::etcd::{EtcdStore, Fence, Members};
use super::StoreError;
use etcd_client::{LeaderKey, ResignOptions};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// What a candidate knows about its own lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// A keep-alive sent less than a TTL ago was answered: the lease lives.
    Confirmed,
    /// No keep-alive answered for a TTL: the lease may have expired. Stop serving; resume if
    /// it is confirmed again.
    Unconfirmed,
    /// etcd said the lease is gone, or nothing was answered for [`LOST_AFTER_TTLS`] TTLs.
    /// Final.
    Lost,
}

#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// The election's name, under the store's prefix (e.g. `/berth/` + `leader`).
    pub name: String,
    /// What the leader announces (its advertised gRPC address).
    pub value: String,
    /// The lease's time to live. etcd refuses less than 1.5 × its election timeout (1.5 s by
    /// default); a standby takes over at most about this long after a leader dies.
    pub ttl: Duration,
}

/// A candidate: its lease is granted and kept alive from [`Election::start`] on.
pub struct Election {
    members: Arc<Members>,
    config: ElectionConfig,
    lease: i64,
    state: watch::Receiver<LeaseState>,
    keeper: tokio::task::JoinHandle<()>,
    judge: tokio::task::JoinHandle<()>,
}

/// Held while this process leads (its [`Election`] keeps the lease alive).
#[derive(Clone)]
pub struct Leadership {
    members: Arc<Members>,
    key: LeaderKey,
    state: watch::Receiver<LeaseState>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Whole seconds for etcd, rounded up (etcd leases count in seconds).
fn ttl_seconds(ttl: Duration) -> i64 {
    let whole = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(whole.max(2)).unwrap_or(i64::MAX)
}

impl Election {
    /// Grants the lease and starts keeping it alive.
    pub async fn start(store: &EtcdStore, config: ElectionConfig) -> Result<Election, StoreError> {
        let members = Arc::new(store.members());
        let ttl = ttl_seconds(config.ttl);
        let grant = members
            .call(|client| async move { client.lease_client().grant(ttl, None).await })
            .await
            .map_err(backend)?;
        let lease = grant.id();
        let ttl_duration = Duration::from_secs(u64::try_from(ttl).unwrap_or(2));
        let (state_tx, state) = watch::channel(LeaseState::Confirmed);
        let state_tx = Arc::new(state_tx);
        let confirmed = Arc::new(Mutex::new(Instant::now()));
        let keeper = tokio::spawn(keep_alive(
            members.clone(),
            lease,
            ttl_duration,
            confirmed.clone(),
            state_tx.clone(),
        ));
        let judge = tokio::spawn(judge(ttl_duration, confirmed, state_tx));
        let config = ElectionConfig {
            name: format!("{}{}", store.prefix(), config.name),
            ..config
        };
        tracing::info!(lease, ttl_seconds = ttl, name = %config.name, "election candidate");
        Ok(Election {
            members,
            config,
            lease,
            state,
            keeper,
            judge,
        })
    }

    /// Waits until this candidate leads. Fails if the lease is lost meanwhile (the process
    /// should start over) or etcd refuses the campaign.
    pub async fn campaign(&self) -> Result<Leadership, StoreError> {
        loop {
            if *self.state.borrow() == LeaseState::Lost {
                return Err(backend("the candidate's lease expired"));
            }
            let (name, value, lease) = (&self.config.name, &self.config.value, self.lease);
            let attempt = self.members.call(|client| {
                let (name, value) = (name.clone(), value.clone());
                async move { client.election_client().campaign(name, value, lease).await }
            });
            let mut state = self.state.clone();
            let started = Instant::now();
            let result = tokio::select! {
                r = attempt => r,
                _ = state.wait_for(|s| *s == LeaseState::Lost) => {
                    return Err(backend("the candidate's lease expired"));
                }
            };
            match result {
                Ok(mut response) => match response.take_leader() {
                    Some(key) => {
                        return Ok(Leadership {
                            members: self.members.clone(),
                            key,
                            state: self.state.clone(),
                        });
                    }
                    None => return Err(backend("etcd's campaign named no leader key")),
                },
                // The client's attempt timeout ends a long wait; campaigning again with the
                // same lease resumes it (etcd keeps the candidate's key): at once after a
                // long wait, after a pause when etcd refused quickly.
                Err(e) => {
                    tracing::debug!(error = %e, "campaign interrupted; campaigning again");
                    if started.elapsed() < Duration::from_secs(1) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }

    /// The candidate's etcd lease.
    pub fn lease_id(&self) -> i64 {
        self.lease
    }

    /// Withdraws: revokes the lease, so this candidate's key does not delay the next election.
    pub async fn withdraw(self) {
        self.keeper.abort();
        self.judge.abort();
        revoke(&self.members, self.lease).await;
    }
}

impl Leadership {
    /// The fence every write of this leader must carry.
    pub fn fence(&self) -> Fence {
        Fence {
            key: self.key.key().to_vec(),
            create_revision: self.key.rev(),
            lease: self.key.lease(),
        }
    }

    /// Resolves once leadership is lost (etcd says the lease is gone, or nothing was answered
    /// for [`LOST_AFTER_TTLS`] TTLs). After this, writes are refused by the fence anyway; stop acting.
    pub async fn lost(&self) {
        let mut state = self.state.clone();
        let _ = state.wait_for(|s| *s == LeaseState::Lost).await;
    }

    /// The lease as this process knows it, live: serve only while it is
    /// [`LeaseState::Confirmed`].
    pub fn state(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Hands leadership over at once: deletes the leader key, so the next candidate leads
    /// within a round trip. (Withdraw the [`Election`] after this to revoke the lease.)
    pub async fn resign(&self) {
        let resign = self.members.call(|client| {
            let options = ResignOptions::new().with_leader(self.key.clone());
            async move { client.election_client().resign(Some(options)).await }
        });
        match tokio::time::timeout(Duration::from_secs(2), resign).await {
            Ok(Ok(_)) => tracing::info!("resigned the leadership"),
            Ok(Err(e)) => tracing::warn!(error = %e, "resigning failed; the lease will expire"),
            Err(_) => tracing::warn!("resigning timed out; the lease will expire"),
        }
    }
}

async fn revoke(members: &Members, lease: i64) {
    let revoke = members.call(|client| async move { client.lease_client().revoke(lease).await });
    match tokio::time::timeout(Duration::from_secs(2), revoke).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, lease, "revoking the lease failed"),
        Err(_) => tracing::warn!(lease, "revoking the lease timed out"),
    }
}

/// An unconfirmed lease is taken as lost after this many TTLs without an answer.
pub const LOST_AFTER_TTLS: u32 = 3;

/// How often the judge looks at the last confirmation.
const JUDGE_PERIOD: Duration = Duration::from_millis(20);

/// Turns the time of the last confirmed keep-alive into the [`LeaseState`]: unconfirmed from
/// `ttl` after it, lost from [`LOST_AFTER_TTLS`] × `ttl`. (The keeper reports [`LeaseState::Lost`] itself when
/// etcd says the lease is gone.)
async fn judge(
    ttl: Duration,
    confirmed: Arc<Mutex<Instant>>,
    state: Arc<watch::Sender<LeaseState>>,
) {
    loop {
        let since = confirmed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .elapsed();
        let now = if since >= ttl * LOST_AFTER_TTLS {
            LeaseState::Lost
        } else if since >= ttl {
            LeaseState::Unconfirmed
        } else {
            LeaseState::Confirmed
        };
        let mut changed_from = None;
        state.send_if_modified(|s| {
            // Lost is final.
            if *s == now || *s == LeaseState::Lost {
                return false;
            }
            changed_from = Some(*s);
            *s = now;
            true
        });
        if let Some(before) = changed_from {
            let since_ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
            match now {
                LeaseState::Confirmed => {
                    tracing::info!(?before, "the lease is confirmed again; serving")
                }
                LeaseState::Unconfirmed => tracing::warn!(
                    since_ms,
                    "no keep-alive answered within the lease TTL; not serving until one is"
                ),
                LeaseState::Lost => tracing::error!(
                    since_ms,
                    "no keep-alive answered for several lease TTLs; the lease is taken as lost"
                ),
            }
        }
        if *state.borrow() == LeaseState::Lost {
            return;
        }
        tokio::time::sleep(JUDGE_PERIOD).await;
    }
}

/// Keeps `lease` alive every `ttl / 6`, reopening the stream on the next member (see
/// [`Members`]) at once after a transport error and after an answer is two periods late (a
/// member that stopped answering keeps its connection open). Each
/// answered keep-alive moves `confirmed` to when it was *sent*: etcd restarts the TTL on
/// receipt, later, so this process always believes its lease ends before etcd does. Reports
/// [`LeaseState::Lost`] when etcd says the lease is gone.
async fn keep_alive(
    members: Arc<Members>,
    lease: i64,
    ttl: Duration,
    confirmed: Arc<Mutex<Instant>>,
    state: Arc<watch::Sender<LeaseState>>,
) {
    let period = ttl / 6;
    let overdue = period * 2;
    let confirm = |sent: Instant| {
        let mut at = confirmed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if sent > *at {
            *at = sent;
        }
    };
    let gone = || {
        tracing::error!(lease, "etcd says the lease has expired");
        state.send_replace(LeaseState::Lost);
    };
    loop {
        if *state.borrow() == LeaseState::Lost {
            return;
        }
        let (member, client) = members.current();
        let mut leases = client.lease_client();
        let mut sent = Instant::now();
        // Opening sends a keep-alive and reads its answer (a lease etcd no longer has fails
        // the opening instead). Any failure moves on to the next member.
        let (mut keeper, mut stream) = match tokio::time::timeout(overdue, leases.keep_alive(lease))
            .await
        {
            Ok(Ok(pair)) => pair,
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(e))) => {
                tracing::error!(error = %e, lease, "etcd refused the keep-alive");
                gone();
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, lease, member, "opening the lease keep-alive failed");
                members.failed(member);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(_) => {
                tracing::warn!(
                    lease,
                    member,
                    "opening the lease keep-alive went unanswered"
                );
                members.failed(member);
                continue;
            }
        };
        confirm(sent);
        while *state.borrow() != LeaseState::Lost {
            tokio::time::sleep(period).await;
            sent = Instant::now();
            if keeper.keep_alive().await.is_err() {
                members.failed(member);
                break;
            }
            match tokio::time::timeout(overdue, stream.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => confirm(sent),
                Ok(Ok(Some(_))) => {
                    gone();
                    return;
                }
                Ok(Ok(None) | Err(_)) => {
                    tracing::warn!(
                        lease,
                        member,
                        "the lease keep-alive stream broke; reopening"
                    );
                    members.failed(member);
                    break;
                }
                Err(_) => {
                    tracing::warn!(
                        lease,
                        member,
                        "a lease keep-alive went unanswered; reopening"
                    );
                    members.failed(member);
                    break;
                }
            }
        }
    }
}
