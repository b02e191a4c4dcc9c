//! The agent's side of containerd's image storage, in the agent's namespace: blobs streamed
//! into the content store and labelled there (the GC labels that keep an image's graph alive),
//! blobs read back, snapshots looked up, pull leases, image records.

use std::collections::HashMap;

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::StatSnapshotRequest;
use containerd_client::services::v1::{
    CreateImageRequest, CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
    Image, InfoRequest, ReadContentRequest, UpdateImageRequest,
    UpdateRequest as UpdateContentRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor as CtrDescriptor;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// The snapshotter every snapshot of the agent lives in.
pub const SNAPSHOTTER: &str = "overlayfs";
/// How long a pull lease may outlive a crashed agent before containerd collects it.
const LEASE_EXPIRY_SECS: u64 = 3600;

/// A containerd storage call that failed.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// a containerd call failed
    #[error("containerd {operation} failed: {}", status.message())]
    Containerd {
        operation: &'static str,
        status: Status,
    },
    /// a blob's body broke off while it was written into the content store
    #[error("downloading {digest} failed: {message}")]
    Download { digest: String, message: String },
}

pub(crate) fn ctr(operation: &'static str) -> impl FnOnce(Status) -> ContentError {
    move |status| ContentError::Containerd { operation, status }
}

/// containerd's image storage in one namespace. Cheap to clone (one gRPC channel).
#[derive(Debug, Clone)]
pub struct ContentStore {
    pub(crate) channel: Channel,
    namespace: String,
}

impl ContentStore {
    pub fn new(channel: Channel, namespace: String) -> Self {
        Self { channel, namespace }
    }

    pub(crate) fn request<T>(&self, message: T, lease: Option<&str>) -> Request<T> {
        let mut request = Request::new(message);
        if let Ok(ns) = self.namespace.parse() {
            request.metadata_mut().insert("containerd-namespace", ns);
        }
        if let Some(lease) = lease.and_then(|l| l.parse().ok()) {
            request.metadata_mut().insert("containerd-lease", lease);
        }
        request
    }
    pub(crate) async fn create_lease(&self) -> Result<String, ContentError> {
        let id = format!("berth-pull-{}", uuid::Uuid::new_v4());
        let labels = expiring_lease_labels(std::time::Duration::from_secs(LEASE_EXPIRY_SECS));
        LeasesClient::new(self.channel.clone())
            .create(self.request(
                CreateLeaseRequest {
                    id: id.clone(),
                    labels,
                },
                None,
            ))
            .await
            .map_err(ctr("Leases.Create"))?;
        Ok(id)
    }
    pub(crate) async fn put_image(
        &self,
        name: &str,
        target: CtrDescriptor,
        lease: &str,
    ) -> Result<(), ContentError> {
        let image = Image {
            name: name.to_string(),
            labels: HashMap::new(),
            target: Some(target),
            created_at: None,
            updated_at: None,
        };
        let mut images = ImagesClient::new(self.channel.clone());
        match images
            .create(self.request(
                CreateImageRequest {
                    image: Some(image.clone()),
                    source_date_epoch: None,
                },
                Some(lease),
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::AlreadyExists => images
                .update(self.request(
                    UpdateImageRequest {
                        image: Some(image),
                        update_mask: None,
                        source_date_epoch: None,
                    },
                    Some(lease),
                ))
                .await
                .map(|_| ())
                .map_err(ctr("Images.Update")),
            Err(status) => Err(ctr("Images.Create")(status)),
        }
    }
    pub(crate) async fn snapshot_exists(&self, key: &str) -> bool {
        SnapshotsClient::new(self.channel.clone())
            .stat(self.request(
                StatSnapshotRequest {
                    snapshotter: SNAPSHOTTER.to_string(),
                    key: key.to_string(),
                },
                None,
            ))
            .await
            .is_ok()
    }
    /// If the blob is in the content store, makes sure it carries `labels` and returns true.
    pub(crate) async fn ensure_labels_if_present(
        &self,
        digest: &str,
        labels: &HashMap<String, String>,
        lease: &str,
    ) -> Result<bool, ContentError> {
        let mut content = ContentClient::new(self.channel.clone());
        let info = match content
            .info(self.request(
                InfoRequest {
                    digest: digest.to_string(),
                },
                None,
            ))
            .await
        {
            Ok(response) => response.into_inner().info,
            Err(status) if status.code() == Code::NotFound => return Ok(false),
            Err(status) => return Err(ctr("Content.Info")(status)),
        };
        let Some(mut info) = info else {
            return Ok(false);
        };
        if labels.iter().all(|(k, v)| info.labels.get(k) == Some(v)) {
            return Ok(true);
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        info.labels.extend(labels.clone());
        content
            .update(self.request(
                UpdateContentRequest {
                    info: Some(info),
                    update_mask: Some(prost_types::FieldMask { paths }),
                },
                Some(lease),
            ))
            .await
            .map_err(ctr("Content.Update"))?;
        Ok(true)
    }
    pub(crate) async fn store_bytes(
        &self,
        lease: &str,
        digest: &str,
        bytes: Vec<u8>,
        labels: HashMap<String, String>,
    ) -> Result<(), ContentError> {
        if self
            .ensure_labels_if_present(digest, &labels, lease)
            .await?
        {
            return Ok(());
        }
        let size = bytes.len() as u64;
        let body = futures::stream::once(async move { Ok::<_, std::convert::Infallible>(bytes) });
        self.write_blob(lease, digest, size, labels, body).await
    }
    /// Streams `body` into Content.Write and commits it under `digest` with `labels`.
    pub(crate) async fn write_blob<S, B, E>(
        &self,
        lease: &str,
        digest: &str,
        size: u64,
        labels: HashMap<String, String>,
        body: S,
    ) -> Result<(), ContentError>
    where
        S: Stream<Item = Result<B, E>> + Send,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let write_ref = format!("berth-{}", uuid::Uuid::new_v4().simple());
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        let (tx, rx) = mpsc::channel::<WriteContentRequest>(4);
        let mut content = ContentClient::new(self.channel.clone());
        let request = self.request(ReceiverStream::new(rx), Some(lease));
        let expected = digest.to_string();
        let feed = async move {
            let mut body = std::pin::pin!(body);
            let mut offset: i64 = 0;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                let chunk = chunk.as_ref();
                let len = chunk.len() as i64;
                let message = WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: write_ref.clone(),
                    total: size,
                    expected: expected.clone(),
                    offset,
                    data: chunk.to_vec(),
                    labels: HashMap::new(),
                };
                if tx.send(message).await.is_err() {
                    return Err("containerd closed the write".to_string());
                }
                offset += len;
            }
            let commit = WriteContentRequest {
                action: WriteAction::Commit as i32,
                r#ref: write_ref,
                total: size,
                expected,
                offset,
                data: Vec::new(),
                labels,
            };
            tx.send(commit)
                .await
                .map_err(|_| "containerd closed the write".to_string())
        };
        let call = async move {
            let mut responses = content.write(request).await?.into_inner();
            let mut committed = false;
            while let Some(response) = responses.message().await? {
                if response.action == WriteAction::Commit as i32 {
                    committed = true;
                }
            }
            Ok::<bool, Status>(committed)
        };
        let (fed, called) = tokio::join!(feed, call);
        match called {
            Ok(true) => {}
            Err(status) if status.code() == Code::AlreadyExists => {}
            Ok(false) => {
                return Err(ContentError::Download {
                    digest: digest.to_string(),
                    message: fed
                        .err()
                        .unwrap_or_else(|| "write ended without commit".into()),
                })
            }
            Err(status) => {
                if let Err(message) = fed {
                    return Err(ContentError::Download {
                        digest: digest.to_string(),
                        message,
                    });
                }
                return Err(ctr("Content.Write")(status));
            }
        }
        tracing::debug!(digest, size, "blob stored");
        Ok(())
    }
    /// Reads a whole blob from the content store; None if absent or unreadable.
    pub(crate) async fn read_content(&self, digest: &str) -> Option<Vec<u8>> {
        let mut stream = ContentClient::new(self.channel.clone())
            .read(self.request(
                ReadContentRequest {
                    digest: digest.to_string(),
                    offset: 0,
                    size: 0,
                },
                None,
            ))
            .await
            .ok()?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await.ok()? {
            out.extend_from_slice(&chunk.data);
        }
        Some(out)
    }

    /// Deletes a pull lease (what it held is then free for containerd's GC); failures are logged.
    pub(crate) async fn delete_lease(&self, lease: &str) {
        if let Err(status) = LeasesClient::new(self.channel.clone())
            .delete(self.request(
                DeleteLeaseRequest {
                    id: lease.to_string(),
                    sync: false,
                },
                None,
            ))
            .await
        {
            tracing::warn!(lease = %lease, %status, "deleting pull lease failed");
        }
    }
}

pub(crate) fn label(key: &str, value: &str) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    labels.insert(key.to_string(), value.to_string());
    labels
}

pub(crate) fn descriptor(media_type: &str, digest: &str, size: u64) -> CtrDescriptor {
    CtrDescriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size: i64::try_from(size).unwrap_or(i64::MAX),
        annotations: HashMap::new(),
    }
}

/// The labels of a lease containerd's GC removes `after` from now (with what it protects),
/// whether or not the agent lives to delete it.
pub(crate) fn expiring_lease_labels(after: std::time::Duration) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    if let Some(expire) = rfc3339(std::time::SystemTime::now() + after) {
        labels.insert("containerd.io/gc.expire".to_string(), expire);
    }
    labels
}

/// Formats a time as RFC 3339 UTC in whole seconds (`2024-01-02T03:04:05Z`), as containerd's
/// `gc.expire` label wants; None for a time RFC 3339 cannot write (beyond the year 9999).
pub(crate) fn rfc3339(at: std::time::SystemTime) -> Option<String> {
    let at = time::OffsetDateTime::from(at).replace_nanosecond(0).ok()?;
    at.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(0);
        assert_eq!(rfc3339(at).as_deref(), Some("1970-01-01T00:00:00Z"));
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_709_251_199_750);
        assert_eq!(rfc3339(at).as_deref(), Some("2024-02-29T23:59:59Z"));
    }
}
