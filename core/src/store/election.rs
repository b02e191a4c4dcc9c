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
//! lease: when a keep-alive answers that the lease is gone, or when no keep-alive has been
//! answered for `ttl`, [`Leadership::lost`] resolves and the process must stop acting.

use super::etcd::{EtcdStore, Fence};
use super::StoreError;
use etcd_client::{Client, LeaderKey, ResignOptions};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

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
    client: Client,
    config: ElectionConfig,
    lease: i64,
    alive: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
}

/// Held while this process leads (its [`Election`] keeps the lease alive).
#[derive(Clone)]
pub struct Leadership {
    client: Client,
    key: LeaderKey,
    alive: watch::Receiver<bool>,
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
        let client = store.client();
        let ttl = ttl_seconds(config.ttl);
        let grant = client
            .lease_client()
            .grant(ttl, None)
            .await
            .map_err(backend)?;
        let lease = grant.id();
        let (alive_tx, alive) = watch::channel(true);
        let keeper = tokio::spawn(keep_alive(
            client.clone(),
            lease,
            Duration::from_secs(u64::try_from(ttl).unwrap_or(2)),
            alive_tx,
        ));
        let config = ElectionConfig {
            name: format!("{}{}", store.prefix(), config.name),
            ..config
        };
        tracing::info!(lease, ttl_seconds = ttl, name = %config.name, "election candidate");
        Ok(Election {
            client,
            config,
            lease,
            alive,
            keeper,
        })
    }

    /// Waits until this candidate leads. Fails if the lease is lost meanwhile (the process
    /// should start over) or etcd refuses the campaign.
    pub async fn campaign(&self) -> Result<Leadership, StoreError> {
        let mut elections = self.client.election_client();
        loop {
            if !*self.alive.borrow() {
                return Err(backend("the candidate's lease expired"));
            }
            let attempt = elections.campaign(
                self.config.name.clone(),
                self.config.value.clone(),
                self.lease,
            );
            let mut alive = self.alive.clone();
            let result = tokio::select! {
                r = attempt => r,
                _ = alive.wait_for(|a| !*a) => {
                    return Err(backend("the candidate's lease expired"));
                }
            };
            match result {
                Ok(mut response) => match response.take_leader() {
                    Some(key) => {
                        return Ok(Leadership {
                            client: self.client.clone(),
                            key,
                            alive: self.alive.clone(),
                        });
                    }
                    None => return Err(backend("etcd's campaign named no leader key")),
                },
                // The client's request timeout ends a long wait; campaigning again with the
                // same lease resumes it (etcd keeps the candidate's key).
                Err(e) => {
                    tracing::debug!(error = %e, "campaign interrupted; campaigning again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
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
        revoke(&self.client, self.lease).await;
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

    /// Resolves once leadership may have been lost (the lease is gone or unconfirmed for a
    /// whole TTL). After this, writes are refused by the fence anyway; stop acting.
    pub async fn lost(&self) {
        let mut alive = self.alive.clone();
        let _ = alive.wait_for(|a| !*a).await;
    }

    /// Hands leadership over at once: deletes the leader key, so the next candidate leads
    /// within a round trip. (Withdraw the [`Election`] after this to revoke the lease.)
    pub async fn resign(&self) {
        let mut elections = self.client.election_client();
        let resign = elections.resign(Some(ResignOptions::new().with_leader(self.key.clone())));
        match tokio::time::timeout(Duration::from_secs(2), resign).await {
            Ok(Ok(_)) => tracing::info!("resigned the leadership"),
            Ok(Err(e)) => tracing::warn!(error = %e, "resigning failed; the lease will expire"),
            Err(_) => tracing::warn!("resigning timed out; the lease will expire"),
        }
    }
}

async fn revoke(client: &Client, lease: i64) {
    let mut leases = client.lease_client();
    match tokio::time::timeout(Duration::from_secs(2), leases.revoke(lease)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, lease, "revoking the lease failed"),
        Err(_) => tracing::warn!(lease, "revoking the lease timed out"),
    }
}

/// Keeps `lease` alive every `ttl / 6`, reopening the stream at once after transport errors
/// (the client does not; and while an etcd member is down, a third of the attempts may be sent
/// to it). Sets `alive` to false, for good, when etcd says the lease is gone or when
/// no keep-alive has been answered for `ttl`.
async fn keep_alive(client: Client, lease: i64, ttl: Duration, alive: watch::Sender<bool>) {
    let period = ttl / 6;
    let mut confirmed = Instant::now();
    loop {
        let mut leases = client.lease_client();
        // Confirmation counts from when a keep-alive was *sent*: etcd restarts the TTL on
        // receipt, later, so this process always believes its lease ends before etcd does.
        let mut sent = Instant::now();
        let opened = tokio::time::timeout(period, leases.keep_alive(lease)).await;
        let (mut keeper, mut stream) = match opened {
            Ok(Ok(pair)) => pair,
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(e))) => {
                tracing::error!(error = %e, lease, "etcd says the lease has expired");
                break;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, lease, "opening the lease keep-alive failed");
                if confirmed.elapsed() >= ttl {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(_) => {
                if confirmed.elapsed() >= ttl {
                    break;
                }
                continue;
            }
        };
        // Opening sends a keep-alive and reads its answer (a lease etcd no longer has fails
        // the opening instead).
        confirmed = sent;
        loop {
            tokio::time::sleep(period).await;
            sent = Instant::now();
            if keeper.keep_alive().await.is_err() {
                break;
            }
            let deadline = confirmed + ttl;
            let answer = tokio::select! {
                m = stream.message() => m,
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::error!(lease, "no keep-alive answered within the lease TTL");
                    alive.send_replace(false);
                    return;
                }
            };
            match answer {
                Ok(Some(r)) if r.ttl() > 0 => confirmed = sent,
                Ok(Some(_)) => {
                    tracing::error!(lease, "etcd says the lease has expired");
                    alive.send_replace(false);
                    return;
                }
                Ok(None) | Err(_) => {
                    tracing::warn!(lease, "the lease keep-alive stream broke; reopening");
                    break;
                }
            }
        }
        if confirmed.elapsed() >= ttl {
            break;
        }
    }
    tracing::error!(lease, "the lease could not be confirmed within its TTL");
    alive.send_replace(false);
}
