//! One etcd client per member, used one at a time.
//!
//! `etcd-client` balances every request over all endpoints and keeps sending a share of them
//! to a member that stopped answering (frozen, or cut off: its connection stays open), and
//! each such request costs a whole timeout. Berth instead keeps a cursor on one member, as
//! etcd's own Go client pins one endpoint: every request goes to the current member, and a
//! transient failure there (refused, reset, or no answer within the attempt timeout) moves
//! the cursor to the next member, so the retry — and everything after it — goes elsewhere.
//! A member is never preferred again on purpose; it is tried again when the cursor comes round.

use super::transient;
use etcd_client::{Client, ConnectOptions};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The members' clients (their connections are shared by every fork) and one cursor.
pub struct Members {
    clients: Arc<Vec<Client>>,
    current: AtomicUsize,
}

impl Members {
    /// One client per endpoint; connections are opened on first use.
    pub(super) async fn connect(
        endpoints: &[String],
        options: &ConnectOptions,
    ) -> Result<Members, etcd_client::Error> {
        let mut clients = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            clients.push(Client::connect([endpoint], Some(options.clone())).await?);
        }
        Ok(Members {
            clients: Arc::new(clients),
            current: AtomicUsize::new(0),
        })
    }

    /// The same connections with a cursor of its own, starting where this one is (an
    /// election's long polls must not move the store's cursor, nor the other way round).
    pub fn fork(&self) -> Members {
        Members {
            clients: self.clients.clone(),
            current: AtomicUsize::new(self.current.load(Ordering::Relaxed)),
        }
    }

    /// The current member and its client.
    pub fn current(&self) -> (usize, Client) {
        let i = self.current.load(Ordering::Relaxed) % self.clients.len().max(1);
        (i, self.clients[i].clone())
    }

    /// Makes member `i` the current one (tests aim faults at the member in use).
    #[cfg(test)]
    pub(super) fn use_member(&self, i: usize) {
        self.current.store(i, Ordering::Relaxed);
    }

    /// Member `i` failed: move on to the next one (unless another caller already moved on).
    pub fn failed(&self, i: usize) {
        let next = (i + 1) % self.clients.len().max(1);
        if self
            .current
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && self.clients.len() > 1
        {
            tracing::info!(
                from = i,
                to = next,
                "etcd member failed; using the next one"
            );
        }
    }

    /// Runs `call` on the current member; a transient failure moves the cursor on. A call
    /// that never reached its member (connection refused) is sent to the next one at once,
    /// each member once at most: it cannot have had an effect.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut tries = self.clients.len().max(1);
        loop {
            let (i, client) = self.current();
            let result = call(client).await;
            match &result {
                Err(e) if transient(e) => {
                    self.failed(i);
                    tries -= 1;
                    if tries == 0 || !never_reached(e) {
                        return result;
                    }
                }
                _ => return result,
            }
        }
    }

    /// Like [`Members::call`], but a transient failure of any kind (a timeout too) sends the
    /// call on to the next member, each member once at most: for calls whose repetition is
    /// harmless even if an attempt did apply (a lease grant: a lost one only expires).
    pub async fn call_on_each<T, F, Fut>(&self, call: F) -> Result<T, etcd_client::Error>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut tries = self.clients.len().max(1);
        loop {
            match self.call(&call).await {
                Err(e) if transient(&e) && tries > 1 => {
                    tries -= 1;
                    tracing::warn!(error = %e, "an etcd call failed; trying the next member");
                }
                result => return result,
            }
        }
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// Whether the request never reached the member (its connection could not be made).
fn never_reached(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => crate::failover::never_sent(status),
        etcd_client::Error::TransportError(error) => crate::failover::never_sent(error),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::etcd::EtcdCluster;
    use std::time::Duration;

    /// A member that refuses connections costs a call nothing: it goes to the next member at
    /// once (not after a timeout: the refusal cannot have had an effect), and the cursor stays
    /// there.
    #[tokio::test]
    async fn a_refused_call_goes_to_the_next_member() {
        let mut cluster = EtcdCluster::start(3).expect("etcd");
        cluster
            .wait_serving(Duration::from_secs(20))
            .expect("serving");
        // A follower, so the others keep a Raft leader and answer at once.
        let down = (cluster.raft_leader().expect("a Raft leader") + 1) % 3;
        cluster.kill(down).expect("kill a follower");
        let options = ConnectOptions::new().with_timeout(Duration::from_secs(2));
        let members = Members::connect(&cluster.endpoints(), &options)
            .await
            .expect("clients");
        members.use_member(down);
        let attempts = std::sync::atomic::AtomicUsize::new(0);
        let answer = members
            .call(|client| {
                attempts.fetch_add(1, Ordering::SeqCst);
                async move { client.kv_client().get("k", None).await }
            })
            .await;
        assert!(answer.is_ok(), "{answer:?}");
        assert_eq!(attempts.load(Ordering::SeqCst), 2, "refused, then answered");
        assert_eq!(members.current().0, (down + 1) % 3);
    }
}
