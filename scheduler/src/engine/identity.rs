//! Node identity: registration tokens and node credentials (issue #12).
//!
//! An admin creates a registration token for a region (`registration_tokens/<id>`: region,
//! expiry, single use or not, uses, the SHA-256 of its secret). An agent exchanges it once, with
//! its node id, for a node credential (`node_credentials/<id>`: node id, region, hash), which
//! it keeps on its disk and presents on every session. A credential speaks as its node only: the
//! session's `Register` must name that node and region, and the scheduler takes every report on
//! the session as that node's (reports about runs leased to other nodes are already ignored).
//! Revoking a node revokes its credentials, closes its session and takes its leases back as for
//! a lost node; removing it (`removal`) does the same and then forgets it. Secrets are random
//! (256 bits): a plain SHA-256 is enough (see `core::auth`).

use super::nodes::node_not_found;
use super::{decode, encode, RevocationMark, Scheduler, State};
use crate::error::SchedulerError;
use berth_core::auth::{self, NodeCredential, RegistrationToken};
use berth_core::store::{Expect, Store, Txn};
use berth_core::validate::ValidationErrors;
use berth_core::{keys, now_unix_millis};
use std::time::Duration;

/// How long a registration token is valid unless the admin says otherwise.
pub const DEFAULT_REGISTRATION_TTL: Duration = Duration::from_secs(3600);
/// The longest a registration token may be valid.
pub const MAX_REGISTRATION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
const NODE_ID_MAX: usize = 128;

/// `[A-Za-z0-9._-]{1,128}`, not `.` or `..`: a node id that can name a key, a directory and a
/// containerd namespace.
pub fn validate_node_id(field: &str, id: &str) -> Result<(), ValidationErrors> {
    let ok = !id.is_empty()
        && id.len() <= NODE_ID_MAX
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ValidationErrors::single(
            field,
            format!("must be 1 to {NODE_ID_MAX} characters of A-Z, a-z, 0-9, `.`, `_` and `-`"),
        ))
    }
}

impl<S: Store> Scheduler<S> {
    /// A new registration token for `region`; answers the record and the plaintext (shown once).
    pub async fn create_registration_token(
        &self,
        region: &str,
        name: &str,
        expires_in: Option<Duration>,
        single_use: bool,
    ) -> Result<(RegistrationToken, String), SchedulerError> {
        if !self.config.catalog.has_region(region) {
            return Err(ValidationErrors::single(
                "region",
                format!(
                    "unknown region {region:?}; known: {}",
                    self.config.catalog.regions.join(", ")
                ),
            )
            .into());
        }
        auth::validate_key_name("name", name)?;
        let ttl = expires_in.unwrap_or(DEFAULT_REGISTRATION_TTL);
        if ttl.is_zero() || ttl > MAX_REGISTRATION_TTL {
            return Err(ValidationErrors::single(
                "expires_in_seconds",
                format!(
                    "must be 1 to {} seconds (30 days)",
                    MAX_REGISTRATION_TTL.as_secs()
                ),
            )
            .into());
        }
        let new = auth::generate_registration_token();
        let now = now_unix_millis();
        let token = RegistrationToken {
            token_id: new.key_id.clone(),
            region: region.to_owned(),
            name: name.to_owned(),
            secret_sha256: new.secret_sha256.clone(),
            created_at: now,
            expires_at: now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
            single_use,
            uses: 0,
            revoked_at: None,
        };
        self.store
            .commit(Txn::new().put(
                keys::registration_token(&token.token_id),
                encode(&token),
                Expect::Absent,
            ))
            .await?;
        tracing::info!(token_id = %token.token_id, region, single_use, expires_at = token.expires_at, "registration token created");
        Ok((token, new.plaintext))
    }

    /// Every registration token, oldest first.
    pub async fn list_registration_tokens(&self) -> Result<Vec<RegistrationToken>, SchedulerError> {
        let mut list = self
            .store
            .list_prefix(keys::REGISTRATION_TOKENS)
            .await?
            .iter()
            .map(|kv| decode::<RegistrationToken>(&kv.key, &kv.value))
            .collect::<Result<Vec<_>, _>>()?;
        list.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then(a.token_id.cmp(&b.token_id))
        });
        Ok(list)
    }

    async fn load_registration_token(
        &self,
        token_id: &str,
    ) -> Result<Option<(RegistrationToken, u64)>, SchedulerError> {
        if !auth::is_key_id(token_id) {
            return Ok(None);
        }
        let key = keys::registration_token(token_id);
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some((decode(&key, &kv.value)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Revokes a registration token: no node enrolls with it any more (nodes already enrolled
    /// keep their credentials). Idempotent.
    pub async fn revoke_registration_token(
        &self,
        token_id: &str,
    ) -> Result<RegistrationToken, SchedulerError> {
        let (mut token, rev) = self
            .load_registration_token(token_id)
            .await?
            .ok_or_else(|| SchedulerError::NotFound {
                kind: "registration token",
                id: token_id.to_owned(),
            })?;
        if token.revoked_at.is_none() {
            token.revoked_at = Some(now_unix_millis());
            self.store
                .commit(Txn::new().put(
                    keys::registration_token(token_id),
                    encode(&token),
                    Expect::Revision(rev),
                ))
                .await?;
            tracing::info!(token_id, "registration token revoked");
        }
        Ok(token)
    }

    /// The credentials ever issued to `node_id`, with their revisions.
    pub(super) async fn node_credentials_of(
        &self,
        node_id: &str,
    ) -> Result<Vec<(NodeCredential, u64)>, SchedulerError> {
        let mut found = Vec::new();
        for kv in self.store.list_prefix(keys::NODE_CREDENTIALS).await? {
            let c: NodeCredential = decode(&kv.key, &kv.value)?;
            if c.node_id == node_id {
                found.push((c, kv.mod_revision));
            }
        }
        Ok(found)
    }

    /// Exchanges a registration token for a credential bound to `node_id` in `region`;
    /// answers the record and the plaintext credential (shown once). Earlier credentials of
    /// the same node id are revoked in the same commit.
    pub async fn enroll_node(
        &self,
        presented: &str,
        node_id: &str,
        region: &str,
    ) -> Result<(NodeCredential, String), SchedulerError> {
        validate_node_id("node_id", node_id)?;
        let invalid = || SchedulerError::NodeUnauthenticated("invalid registration token".into());
        let p = auth::parse_registration_token(presented).ok_or_else(invalid)?;
        // One enrollment at a time: two agents racing for one node id must not both get a
        // valid credential.
        let _one = self.enrolling.lock().await;
        let (mut token, rev) = self
            .load_registration_token(p.key_id)
            .await?
            .ok_or_else(invalid)?;
        if !auth::verify_secret(p.secret, &token.secret_sha256) {
            return Err(invalid());
        }
        let now = now_unix_millis();
        if let Some(why) = token.unusable(now) {
            return Err(SchedulerError::NodeUnauthenticated(why.to_owned()));
        }
        if token.region != region {
            return Err(SchedulerError::Forbidden(format!(
                "this registration token enrolls nodes in region {}, not {region}",
                token.region
            )));
        }
        if self.node_is_live(node_id).await {
            return Err(SchedulerError::NodeIdTaken(format!(
                "node {node_id} is connected right now: a second agent cannot take its id \
                 (stop that agent, or revoke the node first)"
            )));
        }
        let mut txn = Txn::new();
        for (mut old, old_rev) in self.node_credentials_of(node_id).await? {
            if old.revoked_at.is_none() {
                old.revoked_at = Some(now);
                txn = txn.put(
                    keys::node_credential(&old.credential_id),
                    encode(&old),
                    Expect::Revision(old_rev),
                );
            }
        }
        let new = auth::generate_node_credential();
        let credential = NodeCredential {
            credential_id: new.key_id.clone(),
            node_id: node_id.to_owned(),
            region: region.to_owned(),
            secret_sha256: new.secret_sha256.clone(),
            token_id: token.token_id.clone(),
            created_at: now,
            revoked_at: None,
        };
        token.uses += 1;
        txn = txn
            .put(
                keys::node_credential(&credential.credential_id),
                encode(&credential),
                Expect::Absent,
            )
            .put(
                keys::registration_token(&token.token_id),
                encode(&token),
                Expect::Revision(rev),
            );
        self.store.commit(txn).await?;
        tracing::info!(node_id, region, credential_id = %credential.credential_id, token_id = %token.token_id, "node enrolled");
        Ok((credential, new.plaintext))
    }

    /// Whether a node with this id has a session that was heard from within the node TTL.
    async fn node_is_live(&self, node_id: &str) -> bool {
        let connected = self
            .state
            .lock()
            .await
            .nodes
            .get(node_id)
            .is_some_and(|n| n.connected);
        connected
            && self
                .last_seen(node_id)
                .is_some_and(|seen| seen.elapsed() <= self.config.node_ttl)
    }

    /// The credential `presented` is, if it is well formed, known and its secret matches,
    /// revoked or not.
    async fn verify_node_credential(
        &self,
        presented: &str,
    ) -> Result<NodeCredential, SchedulerError> {
        let invalid = || SchedulerError::NodeUnauthenticated("invalid node credential".into());
        let p = auth::parse_node_credential(presented).ok_or_else(invalid)?;
        let key = keys::node_credential(p.key_id);
        let kv = self.store.get(&key).await?.ok_or_else(invalid)?;
        let credential: NodeCredential = decode(&key, &kv.value)?;
        if !auth::verify_secret(p.secret, &credential.secret_sha256) {
            return Err(invalid());
        }
        Ok(credential)
    }

    /// The credential `presented` is, if it is well formed, known, not revoked and its secret
    /// matches.
    pub async fn authenticate_node(
        &self,
        presented: &str,
    ) -> Result<NodeCredential, SchedulerError> {
        let credential = self.verify_node_credential(presented).await?;
        if credential.revoked_at.is_some() {
            return Err(revoked(&credential.node_id));
        }
        Ok(credential)
    }

    /// Checks that `presented` speaks for `node_id`, for a node leaving (`Leave`): another
    /// node's credential is forbidden. A revoked credential of a node that is no longer in the
    /// fleet (it was removed, which revoked it) gets `NotFound`, so a repeated leave learns the
    /// node is gone; one of a node still known is refused as revoked.
    pub async fn authenticate_leaving_node(
        &self,
        presented: &str,
        node_id: &str,
    ) -> Result<(), SchedulerError> {
        let credential = self.verify_node_credential(presented).await?;
        if credential.node_id != node_id {
            return Err(SchedulerError::Forbidden(format!(
                "this credential belongs to node {}; it cannot act for node {node_id}",
                credential.node_id
            )));
        }
        if credential.revoked_at.is_some() {
            if self.node_is_known(node_id).await? {
                return Err(revoked(node_id));
            }
            return Err(node_not_found(node_id));
        }
        Ok(())
    }

    /// Whether the scheduler knows `node_id`: in its node list, or enrolled with a credential
    /// that is not revoked (a node that never connected to this scheduler).
    pub(super) async fn node_is_known(&self, node_id: &str) -> Result<bool, SchedulerError> {
        if self.state.lock().await.nodes.contains_key(node_id) {
            return Ok(true);
        }
        Ok(self
            .node_credentials_of(node_id)
            .await?
            .iter()
            .any(|(c, _)| c.revoked_at.is_none()))
    }

    /// Where the revocation count stands: taken before a session's credential is checked, and
    /// handed to [`Self::attach_node_checked`].
    pub fn revocation_mark(&self) -> RevocationMark {
        RevocationMark(self.revocations.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Revokes (stores) those of `credentials` not revoked yet, in one commit. Run before the
    /// node's session is closed (`cut_off`): an agent must not be able to come back between
    /// the two steps. The caller holds `enrolling`, so no new credential appears meanwhile.
    pub(super) async fn store_revocations(
        &self,
        credentials: Vec<(NodeCredential, u64)>,
        now: i64,
    ) -> Result<(), SchedulerError> {
        let mut txn = Txn::new();
        for (mut c, rev) in credentials {
            if c.revoked_at.is_none() {
                c.revoked_at = Some(now);
                tracing::info!(node_id = %c.node_id, credential_id = %c.credential_id, "node credential revoked");
                txn = txn.put(
                    keys::node_credential(&c.credential_id),
                    encode(&c),
                    Expect::Revision(rev),
                );
            }
        }
        if !txn.is_empty() {
            self.store.commit(txn).await?;
        }
        Ok(())
    }

    /// After its credentials were revoked (stored): the node's session, if still open, ends at
    /// once with `reason` (so nothing more it sends is taken as a live node's), it is marked
    /// lost, and a session whose credential was checked before now cannot register it again
    /// (see [`super::RevocationMark`]).
    pub(super) fn cut_off(&self, st: &mut State, node_id: &str, reason: &str) {
        let at = self
            .revocations
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        st.revoked_at.insert(node_id.to_owned(), at);
        if let Some(node) = st.nodes.get_mut(node_id) {
            if let Some(link) = node.link.take() {
                link.close(reason);
            }
            node.connected = false;
            node.lost = true;
        }
        st.sync_node(node_id);
    }

    /// Revokes every credential of `node_id`, closes its session and handles it as a lost
    /// node: runs it had not started are queued again, started ones end `failed` with
    /// `node_lost`.
    pub async fn revoke_node(&self, node_id: &str) -> Result<(), SchedulerError> {
        let now = now_unix_millis();
        let _one = self.enrolling.lock().await;
        let credentials = self.node_credentials_of(node_id).await?;
        let known = self.state.lock().await.nodes.contains_key(node_id);
        if credentials.is_empty() && !known {
            return Err(node_not_found(node_id));
        }
        self.store_revocations(credentials, now).await?;
        let mut st = self.state.lock().await;
        self.cut_off(
            &mut st,
            node_id,
            &format!("the credential of node {node_id} was revoked"),
        );
        st.take_leases_back(node_id, "was revoked", "was revoked", now)?;
        if st.remove_if_ephemeral_done(node_id) {
            self.forget_liveness(node_id);
        }
        tracing::warn!(node_id, "node revoked: session closed, leases taken back");
        self.settle(st, true).await
    }
}

/// The refusal of a revoked node's credential.
pub(super) fn revoked(node_id: &str) -> SchedulerError {
    SchedulerError::NodeUnauthenticated(format!(
        "the credential of node {node_id} was revoked; enroll again with a registration token"
    ))
}
