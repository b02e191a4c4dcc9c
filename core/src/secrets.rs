//! Secrets at rest: values such as registry passwords are sealed with ChaCha20-Poly1305 under a
//! key that lives in a file of its own (created with mode 0600 on first start), never in the
//! store. A sealed value is `v1:` + base64(nonce ‖ ciphertext ‖ tag).

use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use std::path::Path;

const PREFIX: &str = "v1:";
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read or write the secret key file {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the secret key file {0} does not hold 32 hex-encoded bytes")]
    BadKey(String),
    #[error("a sealed secret is malformed or was sealed with another key")]
    Unseal,
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

    pub fn seal(&self, plaintext: &str) -> String {
        let cipher = ChaCha20Poly1305::new(&self.0);
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        // Encryption with a valid key and nonce cannot fail for in-memory buffers.
        let sealed = cipher
            .encrypt(&nonce, plaintext.as_bytes())
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(out)
        )
    }

    pub fn open(&self, sealed: &str) -> Result<String, SecretError> {
        let body = sealed.strip_prefix(PREFIX).ok_or(SecretError::Unseal)?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| SecretError::Unseal)?;
        if raw.len() < NONCE_LEN {
            return Err(SecretError::Unseal);
        }
        let (nonce, ciphertext) = raw.split_at(NONCE_LEN);
        let cipher = ChaCha20Poly1305::new(&self.0);
        let plain = cipher
            .decrypt(Nonce::from_slice(nonce), ciphertext)
            .map_err(|_| SecretError::Unseal)?;
        String::from_utf8(plain).map_err(|_| SecretError::Unseal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open_round_trip_without_the_plaintext_in_the_sealed_form() {
        let key = SecretKey::generate();
        let sealed = key.seal("hunter2-very-secret");
        assert!(sealed.starts_with("v1:"));
        assert!(!sealed.contains("hunter2"));
        assert_ne!(
            sealed,
            key.seal("hunter2-very-secret"),
            "fresh nonce each time"
        );
        assert_eq!(
            key.open(&sealed).ok().as_deref(),
            Some("hunter2-very-secret")
        );
    }

    #[test]
    fn another_key_or_a_tampered_value_cannot_open_it() {
        let (a, b) = (SecretKey::generate(), SecretKey::generate());
        let sealed = a.seal("x");
        assert!(b.open(&sealed).is_err());
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(a.open(&tampered).is_err());
        assert!(a.open("plain").is_err());
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
        assert_eq!(
            again.open(&first.seal("same key")).ok().as_deref(),
            Some("same key")
        );
        std::fs::write(&path, "not hex").expect("write");
        assert!(matches!(
            SecretKey::load_or_create(&path),
            Err(SecretError::BadKey(_))
        ));
    }
}
