//! API keys: created and revoked by an admin, verified for the API on every request. The store
//! keeps `apikeys/<key id>` with the key's project, name and the SHA-256 of its secret; the
//! plaintext exists only in the answer to `create_api_key`.

use super::{decode, encode, Scheduler};
use crate::error::SchedulerError;
use berth_core::auth::{self, ApiKey};
use berth_core::store::{Expect, Store, Txn};
use berth_core::{keys, now_unix_millis};

impl<S: Store> Scheduler<S> {
    /// A new key for `project`; answers the record and the plaintext key (shown once).
    pub async fn create_api_key(
        &self,
        project: &str,
        name: &str,
    ) -> Result<(ApiKey, String), SchedulerError> {
        auth::validate_project("project", project)?;
        auth::validate_key_name("name", name)?;
        let new = auth::generate_key();
        let key = ApiKey {
            key_id: new.key_id.clone(),
            project: project.to_owned(),
            name: name.to_owned(),
            secret_sha256: new.secret_sha256.clone(),
            created_at: now_unix_millis(),
            revoked_at: None,
        };
        self.store
            .commit(Txn::new().put(keys::api_key(&key.key_id), encode(&key), Expect::Absent))
            .await?;
        tracing::info!(key_id = %key.key_id, project, "api key created");
        Ok((key, new.plaintext))
    }

    /// Every key (of `project`, when given), oldest first by id order.
    pub async fn list_api_keys(
        &self,
        project: Option<&str>,
    ) -> Result<Vec<ApiKey>, SchedulerError> {
        let kvs = self.store.list_prefix(keys::API_KEYS).await?;
        let mut list = kvs
            .iter()
            .map(|kv| decode::<ApiKey>(&kv.key, &kv.value))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(p) = project {
            list.retain(|k| k.project == p);
        }
        list.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then(a.key_id.cmp(&b.key_id))
        });
        Ok(list)
    }

    async fn load_api_key(&self, key_id: &str) -> Result<(ApiKey, u64), SchedulerError> {
        let not_found = || SchedulerError::NotFound {
            kind: "api key",
            id: key_id.to_owned(),
        };
        if !auth::is_key_id(key_id) {
            return Err(not_found());
        }
        let key = keys::api_key(key_id);
        let kv = self.store.get(&key).await?.ok_or_else(not_found)?;
        Ok((decode(&key, &kv.value)?, kv.mod_revision))
    }

    /// Revokes a key at once: the next request with it is refused. Idempotent.
    pub async fn revoke_api_key(&self, key_id: &str) -> Result<ApiKey, SchedulerError> {
        let (mut key, rev) = self.load_api_key(key_id).await?;
        if key.revoked_at.is_some() {
            return Ok(key);
        }
        key.revoked_at = Some(now_unix_millis());
        self.store
            .commit(Txn::new().put(keys::api_key(key_id), encode(&key), Expect::Revision(rev)))
            .await?;
        tracing::info!(key_id, project = %key.project, "api key revoked");
        Ok(key)
    }

    /// The key `presented` is, if it is well-formed, known, not revoked and its secret matches.
    pub async fn authenticate_api_key(&self, presented: &str) -> Result<ApiKey, SchedulerError> {
        let p = auth::parse_key(presented).ok_or(SchedulerError::Unauthenticated)?;
        let key = match self.load_api_key(p.key_id).await {
            Ok((key, _)) => key,
            Err(SchedulerError::NotFound { .. }) => return Err(SchedulerError::Unauthenticated),
            Err(e) => return Err(e),
        };
        // Verify the secret before looking at revocation, so a wrong secret learns nothing.
        if !auth::verify_secret(p.secret, &key.secret_sha256) || key.revoked_at.is_some() {
            return Err(SchedulerError::Unauthenticated);
        }
        Ok(key)
    }
}
