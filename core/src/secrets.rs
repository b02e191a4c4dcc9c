//! Secrets at rest: values such as registry passwords are sealed with ChaCha20-Poly1305 under a
//! key that lives in a file of its own (created with mode 0600 on first start), never in the
//! store. A sealed value is `v2:` + base64(nonce ‖ ciphertext ‖ tag), bound to the key or record
//! it belongs to (AEAD associated data); older builds wrote `v1:` without it.

use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, AeadInPlace, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use std::path::Path;

/// Sealed by older builds: no associated data.
const PREFIX_V1: &str = "v1:";
/// Bound to a context (associated data).
const PREFIX_V2: &str = "v2:";
const NONCE_LEN: usize = 12;
/// Poly1305's tag, after the ciphertext.
const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read or write the secret key file {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the secret key file {0} does not hold 32 hex-encoded bytes")]
    BadKey(String),
    #[error("a sealed secret is malformed, was sealed with another key, or belongs elsewhere")]
    Unseal,
    #[error("sealing a secret failed")]
    Seal,
}

/// The key that seals secrets. Its `Debug` output never shows the key.
pub struct SecretKey(Key);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    pub fn generate() -> SecretKey {
        SecretKey(ChaCha20Poly1305::generate_key(&mut OsRng))
    }

    /// Reads the key from `path`, or creates it there (mode 0600) if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<SecretKey, SecretError> {
        let io = |source| SecretError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim())
                    .map_err(|_| SecretError::BadKey(path.display().to_string()))?;
                if bytes.len() != 32 {
                    return Err(SecretError::BadKey(path.display().to_string()));
                }
                Ok(SecretKey(*Key::from_slice(&bytes)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SecretKey::generate();
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                file.write_all(hex::encode(key.0).as_bytes()).map_err(io)?;
                file.sync_all().map_err(io)?;
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Seals `plaintext` bound to `context` (the store key or record it belongs to, as AEAD
    /// associated data): `v2:` + base64(nonce ‖ ciphertext ‖ tag). A sealed value copied under
    /// another context does not open. Fails (never returns something weaker) if encryption
    /// does.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Result<String, SecretError> {
        let cipher = ChaCha20Poly1305::new(&self.0);
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        // Nonce, ciphertext (encrypted in place) and tag in one buffer, then its text form in
        // one string.
        let mut raw = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(plaintext);
        let tag = cipher
            .encrypt_in_place_detached(&nonce, context.as_bytes(), &mut raw[NONCE_LEN..])
            .map_err(|_| SecretError::Seal)?;
        raw.extend_from_slice(&tag);
        let mut out = String::with_capacity(Self::sealed_len(plaintext.len()));
        out.push_str(PREFIX_V2);
        base64::engine::general_purpose::STANDARD.encode_string(&raw, &mut out);
        Ok(out)
    }

    /// The length of what [`SecretKey::seal`] makes of `plaintext_len` bytes.
    pub fn sealed_len(plaintext_len: usize) -> usize {
        // Nonce (12) and tag (16) around the ciphertext, base64 (padded), after the prefix.
        PREFIX_V2.len() + (plaintext_len + 28).div_ceil(3) * 4
    }

    /// Opens what [`SecretKey::seal`] sealed for `context`. A `v1:` value (sealed by older
    /// builds, bound to nothing) still opens, whatever the context: the next write of its
    /// record seals it as `v2:`.
    pub fn open(&self, context: &str, sealed: &str) -> Result<Vec<u8>, SecretError> {
        let (body, aad) = if let Some(body) = sealed.strip_prefix(PREFIX_V2) {
            (body, context.as_bytes())
        } else if let Some(body) = sealed.strip_prefix(PREFIX_V1) {
            (body, &b""[..])
        } else {
            return Err(SecretError::Unseal);
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| SecretError::Unseal)?;
        if raw.len() < NONCE_LEN {
            return Err(SecretError::Unseal);
        }
        let (nonce, ciphertext) = raw.split_at(NONCE_LEN);
        ChaCha20Poly1305::new(&self.0)
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| SecretError::Unseal)
    }

    /// [`SecretKey::open`], for text.
    pub fn open_text(&self, context: &str, sealed: &str) -> Result<String, SecretError> {
        String::from_utf8(self.open(context, sealed)?).map_err(|_| SecretError::Unseal)
    }

    /// Whether `value` has the form of a sealed value (either version).
    pub fn is_sealed(value: &[u8]) -> bool {
        value.starts_with(PREFIX_V1.as_bytes()) || value.starts_with(PREFIX_V2.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stores count a sealed value at this length against their request limits.
    #[test]
    fn sealed_len_is_the_length_seal_makes() {
        let key = SecretKey::generate();
        for n in [0, 1, 2, 3, 4, 100, 1000, 4097, 65_536] {
            let sealed = key.seal("runs/x", &vec![b'a'; n]).expect("seal");
            assert_eq!(SecretKey::sealed_len(n), sealed.len(), "{n} bytes");
        }
    }

    #[test]
    fn seal_and_open_round_trip_without_the_plaintext_in_the_sealed_form() {
        let key = SecretKey::generate();
        let sealed = key.seal("runs/a", b"hunter2-very-secret").expect("seal");
        assert!(sealed.starts_with("v2:"));
        assert!(!sealed.contains("hunter2"));
        assert_ne!(
            sealed,
            key.seal("runs/a", b"hunter2-very-secret").expect("seal"),
            "fresh nonce each time"
        );
        assert_eq!(
            key.open_text("runs/a", &sealed).ok().as_deref(),
            Some("hunter2-very-secret")
        );
    }

    #[test]
    fn a_sealed_value_opens_only_in_its_own_context() {
        let key = SecretKey::generate();
        let sealed = key.seal("runs/a", b"secret").expect("seal");
        assert!(key.open("runs/b", &sealed).is_err(), "moved to another key");
        assert!(key.open("", &sealed).is_err());
    }

    #[test]
    fn another_key_or_a_tampered_value_cannot_open_it() {
        let (a, b) = (SecretKey::generate(), SecretKey::generate());
        let sealed = a.seal("k", b"x").expect("seal");
        assert!(b.open("k", &sealed).is_err());
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(a.open("k", &tampered).is_err());
        assert!(a.open("k", "plain").is_err());
        assert!(!SecretKey::is_sealed(b"plain"));
        assert!(SecretKey::is_sealed(sealed.as_bytes()));
    }

    /// What older builds wrote (no associated data) still opens.
    #[test]
    fn a_v1_value_still_opens() {
        let key = SecretKey::generate();
        let cipher = ChaCha20Poly1305::new(&key.0);
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let mut raw = nonce.to_vec();
        raw.extend(cipher.encrypt(&nonce, &b"legacy"[..]).expect("encrypt"));
        let v1 = format!(
            "v1:{}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        );
        assert_eq!(
            key.open_text("anything", &v1).ok().as_deref(),
            Some("legacy")
        );
    }

    #[test]
    fn the_key_file_is_created_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/secret.key");
        let first = SecretKey::load_or_create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = SecretKey::load_or_create(&path).expect("load");
        let sealed = first.seal("ctx", b"same key").expect("seal");
        assert_eq!(
            again.open_text("ctx", &sealed).ok().as_deref(),
            Some("same key")
        );
        std::fs::write(&path, "not hex").expect("write");
        assert!(matches!(
            SecretKey::load_or_create(&path),
            Err(SecretError::BadKey(_))
        ));
    }
}
