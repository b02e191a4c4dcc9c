//! The node's credential: read from its file, or obtained once by exchanging a registration
//! token with the scheduler (`AgentService.Enroll`) and written to that file (0600) before
//! it is used, so a restarted agent never needs the token again.

use berth_core::failover::SchedulerAddrs;
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_proto::v1::EnrollRequest;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("reading the node credential {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the node credential {path} is readable by other users (mode {mode:o}); \
         `chmod 600` it, or remove it and enroll again"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the node credential {0} is empty")]
    Empty(PathBuf),
    #[error("writing the node credential {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The scheduler refused the registration token (for good: retrying cannot help).
    #[error("the scheduler refused to enroll this node: {0}")]
    Refused(String),
}

/// The credential in `path`, if the file exists. A file others can read is refused, as ssh
/// refuses a private key others can read.
pub fn read_credential(path: &Path) -> Result<Option<String>, EnrollError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(EnrollError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(EnrollError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| EnrollError::Read {
        path: path.to_owned(),
        source,
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err(EnrollError::Empty(path.to_owned()));
    }
    Ok(Some(text.to_owned()))
}

/// Writes `credential` to `path`, 0600, atomically (a temporary file renamed over it).
pub fn write_credential(path: &Path, credential: &str) -> Result<(), EnrollError> {
    let err = |source| EnrollError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(credential.as_bytes()).map_err(err)?;
    f.write_all(b"\n").map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

/// Whether a refusal is final: the token or the request is wrong, not the moment.
fn is_final(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::AlreadyExists
            | tonic::Code::InvalidArgument
            | tonic::Code::Unimplemented
    )
}

/// Exchanges `token` for this node's credential with whichever scheduler answers (the leader),
/// retrying with backoff while none does; a refusal is final.
pub async fn enroll(
    schedulers: &SchedulerAddrs,
    token: &str,
    node_id: &str,
    region: &str,
) -> Result<String, EnrollError> {
    let mut backoff = Duration::from_millis(200);
    let mut attempt = 0usize;
    loop {
        let index = attempt % schedulers.len().max(1);
        attempt += 1;
        let endpoint = schedulers.endpoint(index);
        let url = endpoint.uri().to_string();
        let answer = match endpoint.connect().await {
            Ok(channel) => {
                AgentServiceClient::new(channel)
                    .enroll(EnrollRequest {
                        registration_token: token.to_owned(),
                        node_id: node_id.to_owned(),
                        region: region.to_owned(),
                    })
                    .await
            }
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        match answer {
            Ok(r) => {
                let r = r.into_inner();
                tracing::info!(node_id, credential_id = %r.credential_id, scheduler = %url, "enrolled");
                return Ok(r.node_credential);
            }
            Err(status) if is_final(status.code()) => {
                return Err(EnrollError::Refused(status.message().to_owned()))
            }
            Err(status) => {
                tracing::warn!(scheduler = %url, error = %status.message(), retry_in_ms = backoff.as_millis() as u64, "could not enroll yet");
                if attempt.is_multiple_of(schedulers.len().max(1)) {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_is_written_private_and_read_back_and_an_exposed_one_is_refused(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sub").join("node.credential");
        assert!(read_credential(&path)?.is_none());
        write_credential(&path, "berthnode_x")?;
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_credential(&path)?.as_deref(), Some("berthnode_x"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        assert!(matches!(
            read_credential(&path),
            Err(EnrollError::Exposed { mode: 0o644, .. })
        ));
        Ok(())
    }
}
