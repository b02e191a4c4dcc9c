//! Projects and API keys: what a caller is, and how a key proves it.
//!
//! Every runner, run and container registry belongs to one project (records written before
//! projects existed belong to [`DEFAULT_PROJECT`]). An API key belongs to one project and is
//! `berth_<key id>_<secret>`: the key id (16 hex digits) is public and names the stored record;
//! the secret is 32 random bytes (64 hex digits) and is stored only as its SHA-256. A plain,
//! unsalted hash is enough here because the secret is uniformly random with 256 bits of entropy
//! (nothing to guess from a dictionary, nothing a salt or a slow hash would add); a user-chosen
//! password would need a slow salted hash instead. Hashes are compared in constant time.

use crate::validate::ValidationErrors;
use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::OsRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The project of records that have none and of callers using the admin token.
pub const DEFAULT_PROJECT: &str = "default";
/// gRPC metadata the API sets on every control call: the caller's project.
pub const PROJECT_METADATA: &str = "x-berth-project";
/// gRPC metadata the API sets (to `true`) only for callers holding the admin token.
pub const ADMIN_METADATA: &str = "x-berth-admin";
/// gRPC metadata carrying the cluster token: the shared secret the API and the node agents
/// present on every call to the scheduler when it runs with `--cluster-token`.
pub const CLUSTER_TOKEN_METADATA: &str = "x-berth-cluster-token";

/// Whether a call presenting `presented` passes a scheduler that requires `required` (none:
/// every call passes).
pub fn cluster_token_ok(required: Option<&str>, presented: Option<&[u8]>) -> bool {
    match required {
        None => true,
        Some(want) => presented.is_some_and(|got| constant_time_eq(got, want.as_bytes())),
    }
}

pub const PROJECT_MAX: usize = 63;
pub const KEY_NAME_MAX: usize = 64;
const KEY_PREFIX: &str = "berth_";
const KEY_ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// `serde(default)` for records written before projects existed.
pub fn default_project() -> String {
    DEFAULT_PROJECT.to_owned()
}

/// `[a-z0-9][a-z0-9-]{0,62}`.
pub fn is_project_name(p: &str) -> bool {
    let b = p.as_bytes();
    !b.is_empty()
        && b.len() <= PROJECT_MAX
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Checks a project name given in `field`.
pub fn validate_project(field: &str, p: &str) -> Result<(), ValidationErrors> {
    if is_project_name(p) {
        Ok(())
    } else {
        Err(ValidationErrors::single(
            field,
            format!(
                "must be 1 to {PROJECT_MAX} characters of a-z, 0-9 and `-`, starting with a letter or digit"
            ),
        ))
    }
}

/// Checks an API key's optional label: at most 64 characters, no control characters.
pub fn validate_key_name(field: &str, name: &str) -> Result<(), ValidationErrors> {
    if name.chars().count() > KEY_NAME_MAX || name.chars().any(char::is_control) {
        return Err(ValidationErrors::single(
            field,
            format!("must be at most {KEY_NAME_MAX} characters, without control characters"),
        ));
    }
    Ok(())
}

/// An API key as the store keeps it: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub key_id: String,
    pub project: String,
    pub name: String,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// The parts of a presented key (not yet verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedKey<'a> {
    pub key_id: &'a str,
    pub secret: &'a str,
}

/// A freshly generated key: the plaintext exists only here and in the one answer that shows it.
pub struct NewKey {
    pub key_id: String,
    pub plaintext: String,
    pub secret_sha256: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("key_id", &self.key_id)
            .field("plaintext", &"<redacted>")
            .finish()
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    OsRng.fill_bytes(&mut buf);
    hex::encode(buf)
}

/// A new key from the operating system's random source.
pub fn generate_key() -> NewKey {
    generate_with_prefix(KEY_PREFIX)
}

fn generate_with_prefix(prefix: &str) -> NewKey {
    let key_id = random_hex(KEY_ID_BYTES);
    let secret = random_hex(SECRET_BYTES);
    NewKey {
        plaintext: format!("{prefix}{key_id}_{secret}"),
        secret_sha256: hash_secret(&secret),
        key_id,
    }
}

/// `<prefix><16 hex>_<64 hex>` → its parts.
fn parse_with_prefix<'a>(token: &'a str, prefix: &str) -> Option<PresentedKey<'a>> {
    let rest = token.strip_prefix(prefix)?;
    let (key_id, secret) = rest.split_once('_')?;
    (is_lower_hex(key_id, KEY_ID_BYTES * 2) && is_lower_hex(secret, SECRET_BYTES * 2))
        .then_some(PresentedKey { key_id, secret })
}

/// A registration token: `berthreg_<token id>_<secret>`, the same shape and strength as an API
/// key. An admin creates it for one region; an agent exchanges it once for a node credential.
const REGISTRATION_PREFIX: &str = "berthreg_";
/// A node credential: `berthnode_<credential id>_<secret>`. It speaks as one node only.
const NODE_CREDENTIAL_PREFIX: &str = "berthnode_";

/// gRPC metadata carrying an agent's node credential on `AgentService.Attach`.
pub const NODE_CREDENTIAL_METADATA: &str = "x-berth-node-credential";

/// The metadata in which a refused node removal (`FAILED_PRECONDITION`: the node still holds
/// runs) carries the number of those runs, as decimal text (`AgentService.Leave` documents it).
pub const ACTIVE_RUNS_METADATA: &str = "x-berth-active-runs";

pub fn generate_registration_token() -> NewKey {
    generate_with_prefix(REGISTRATION_PREFIX)
}

pub fn parse_registration_token(token: &str) -> Option<PresentedKey<'_>> {
    parse_with_prefix(token, REGISTRATION_PREFIX)
}

/// An ephemeral run's claim: `berthclaim_<64 hex>` (the whole string is the secret) and its
/// SHA-256. The run's creator hands it to the node it starts for the run (`berthctl run --here`);
/// a registration token alone does not let a node take someone's run.
pub fn generate_ephemeral_claim() -> (String, String) {
    let plaintext = format!("{EPHEMERAL_CLAIM_PREFIX}{}", random_hex(SECRET_BYTES));
    let sha256 = hash_secret(&plaintext);
    (plaintext, sha256)
}

/// Whether `presented` is a well-formed claim whose SHA-256 is `claim_sha256`.
pub fn verify_ephemeral_claim(presented: &str, claim_sha256: &str) -> bool {
    presented
        .strip_prefix(EPHEMERAL_CLAIM_PREFIX)
        .is_some_and(|rest| is_lower_hex(rest, SECRET_BYTES * 2))
        && verify_secret(presented, claim_sha256)
}

const EPHEMERAL_CLAIM_PREFIX: &str = "berthclaim_";

pub fn generate_node_credential() -> NewKey {
    generate_with_prefix(NODE_CREDENTIAL_PREFIX)
}

pub fn parse_node_credential(token: &str) -> Option<PresentedKey<'_>> {
    parse_with_prefix(token, NODE_CREDENTIAL_PREFIX)
}

/// A registration token as the store keeps it (`registration_tokens/<id>`): never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationToken {
    pub token_id: String,
    /// The region every node enrolled with it must register in.
    pub region: String,
    pub name: String,
    pub secret_sha256: String,
    pub created_at: i64,
    pub expires_at: i64,
    /// Refused after its first successful use.
    pub single_use: bool,
    /// Nodes enrolled with it.
    pub uses: u64,
    pub revoked_at: Option<i64>,
}

impl RegistrationToken {
    /// Why it cannot enroll a node at `now`, if it cannot.
    pub fn unusable(&self, now: i64) -> Option<&'static str> {
        if self.revoked_at.is_some() {
            Some("the registration token was revoked")
        } else if now >= self.expires_at {
            Some("the registration token has expired")
        } else if self.single_use && self.uses > 0 {
            Some("the single-use registration token was already used")
        } else {
            None
        }
    }
}

/// A node's credential as the store keeps it (`node_credentials/<id>`): bound to one node id
/// and region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCredential {
    pub credential_id: String,
    pub node_id: String,
    pub region: String,
    pub secret_sha256: String,
    /// The registration token it was exchanged for.
    pub token_id: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `berth_<16 hex>_<64 hex>` → its parts; anything else is not a key.
pub fn parse_key(token: &str) -> Option<PresentedKey<'_>> {
    parse_with_prefix(token, KEY_PREFIX)
}

/// Whether `key_id` has the shape of a key id (so it can name a store key safely).
pub fn is_key_id(key_id: &str) -> bool {
    is_lower_hex(key_id, KEY_ID_BYTES * 2)
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Equality that takes the same time wherever the inputs differ (lengths are not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `secret` is the one whose hash `stored` holds.
pub fn verify_secret(secret: &str, secret_sha256: &str) -> bool {
    constant_time_eq(hash_secret(secret).as_bytes(), secret_sha256.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_secret_kinds_never_parse_as_one_another() {
        let key = generate_key();
        let reg = generate_registration_token();
        let node = generate_node_credential();
        assert!(parse_key(&key.plaintext).is_some());
        assert!(parse_registration_token(&reg.plaintext).is_some());
        assert!(parse_node_credential(&node.plaintext).is_some());
        for (text, id) in [
            (&reg.plaintext, &reg.key_id),
            (&node.plaintext, &node.key_id),
        ] {
            assert!(parse_key(text).is_none(), "{text}");
            let kind = parse_registration_token(text).or_else(|| parse_node_credential(text));
            assert_eq!(kind.map(|p| p.key_id), Some(id.as_str()));
        }
        assert!(parse_registration_token(&node.plaintext).is_none());
        assert!(parse_node_credential(&reg.plaintext).is_none());
        assert!(parse_node_credential(&key.plaintext).is_none());
        let presented = parse_node_credential(&node.plaintext).map(|p| p.secret);
        assert!(presented.is_some_and(|s| verify_secret(s, &node.secret_sha256)));
    }

    #[test]
    fn a_registration_token_is_unusable_once_revoked_expired_or_used_up() {
        let mut t = RegistrationToken {
            token_id: "a".repeat(16),
            region: "fra".to_owned(),
            name: String::new(),
            secret_sha256: String::new(),
            created_at: 0,
            expires_at: 1_000,
            single_use: true,
            uses: 0,
            revoked_at: None,
        };
        assert_eq!(t.unusable(999), None);
        assert!(t.unusable(1_000).is_some_and(|w| w.contains("expired")));
        t.uses = 1;
        assert!(t.unusable(0).is_some_and(|w| w.contains("already used")));
        t.single_use = false;
        assert_eq!(t.unusable(0), None);
        t.revoked_at = Some(5);
        assert!(t.unusable(0).is_some_and(|w| w.contains("revoked")));
    }

    #[test]
    fn the_cluster_token_is_required_only_when_set() {
        assert!(cluster_token_ok(None, None));
        assert!(cluster_token_ok(None, Some(b"anything")));
        assert!(cluster_token_ok(
            Some("s3cret-token"),
            Some(b"s3cret-token")
        ));
        assert!(!cluster_token_ok(Some("s3cret-token"), None));
        assert!(!cluster_token_ok(
            Some("s3cret-token"),
            Some(b"s3cret-tokeN")
        ));
        assert!(!cluster_token_ok(Some("s3cret-token"), Some(b"s3cret")));
    }

    #[test]
    fn project_names() {
        for ok in ["default", "a", "0", "alpha-1", &"a".repeat(63)] {
            assert!(is_project_name(ok), "{ok}");
        }
        for bad in ["", "-a", "Alpha", "a_b", "a b", "ä", &"a".repeat(64), "a/b"] {
            assert!(!is_project_name(bad), "{bad}");
        }
        let e = validate_project("project", "Bad")
            .err()
            .map(|e| e.0[0].field.clone());
        assert_eq!(e.as_deref(), Some("project"));
    }

    #[test]
    fn generated_keys_parse_and_verify() {
        let k = generate_key();
        let p = parse_key(&k.plaintext).expect("a generated key parses");
        assert_eq!(p.key_id, k.key_id);
        assert_eq!(p.secret.len(), 64, "32 bytes of secret");
        assert!(verify_secret(p.secret, &k.secret_sha256));
        assert!(!k.secret_sha256.contains(p.secret));
        assert!(!format!("{k:?}").contains(p.secret), "Debug hides the key");
        let other = generate_key();
        assert_ne!(other.key_id, k.key_id);
        assert!(!verify_secret(p.secret, &other.secret_sha256));
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        let id = "0123456789abcdef";
        let secret = "ab".repeat(32);
        assert!(parse_key(&format!("berth_{id}_{secret}")).is_some());
        for bad in [
            String::new(),
            format!("berth_{id}{secret}"),
            format!("berth{id}_{secret}"),
            format!("berth_{id}_{}", &secret[1..]),
            format!("berth_{}_{secret}", &id[1..]),
            format!("berth_{}_{secret}", id.to_uppercase()),
            format!("berth_{id}_{secret}x"),
            format!("berth_{id}_{secret}_"),
            format!("xberth_{id}_{secret}"),
            format!("berth_{id}_{}", "zz".repeat(32)),
        ] {
            assert!(parse_key(&bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn hashing_is_sha256_hex() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abd", b"abc"));
        assert!(!constant_time_eq(b"bbc", b"abc"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"", b"abc"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn key_names() {
        assert!(validate_key_name("name", "").is_ok());
        assert!(validate_key_name("name", "ci deploy").is_ok());
        assert!(validate_key_name("name", &"x".repeat(65)).is_err());
        assert!(validate_key_name("name", "a\nb").is_err());
    }
}
