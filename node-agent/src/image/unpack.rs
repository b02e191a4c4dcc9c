//! Unpacking an image's layers into snapshots named by chain ID. containerd's Diff service
//! decompresses each layer (gzip, zstd or none, by its media type) into a prepared snapshot and
//! reports the digest of the tar it applied; that must be the layer's diff ID from the image
//! config, or the snapshot would be named by a chain ID that is not its content's.

use std::collections::HashMap;

use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::services::v1::ApplyRequest;
use containerd_client::types::Descriptor as CtrDescriptor;
use oci_spec::image::Descriptor;
use tonic::Code;

use crate::image::content::{ctr, descriptor, ContentError, ContentStore, SNAPSHOTTER};
use crate::image::manifest::layer_compression;

/// A layer that could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error(transparent)]
    Content(#[from] ContentError),
    /// the uncompressed layer containerd applied is not the one the image config names
    #[error("layer {layer} unpacks to {actual}, but the image config says {expected}")]
    DiffIdMismatch {
        layer: String,
        expected: String,
        actual: String,
    },
}

/// Applies every layer whose chain-ID snapshot does not exist yet. containerd decompresses
/// the layer (gzip, zstd or none, by its media type) and reports the digest of the tar it
/// applied; that must be the layer's diff ID, or the snapshot would be named by a chain ID
/// that is not its content's.
pub(crate) async fn unpack(
    store: &ContentStore,
    layers: &[Descriptor],
    diff_ids: &[String],
    chains: &[String],
    lease: &str,
) -> Result<(), UnpackError> {
    let mut snapshots = SnapshotsClient::new(store.channel.clone());
    let mut diff = DiffClient::new(store.channel.clone());
    for (i, ((layer, diff_id), chain)) in layers.iter().zip(diff_ids).zip(chains).enumerate() {
        if store.snapshot_exists(chain).await {
            continue;
        }
        let parent = if i == 0 {
            String::new()
        } else {
            chains[i - 1].clone()
        };
        let key = format!("berth-extract-{}-{chain}", uuid::Uuid::new_v4().simple());
        let mounts = snapshots
            .prepare(store.request(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.to_string(),
                    key: key.clone(),
                    parent,
                    labels: HashMap::new(),
                },
                Some(lease),
            ))
            .await
            .map_err(ctr("Snapshots.Prepare"))?
            .into_inner()
            .mounts;
        let applied = diff
            .apply(store.request(
                ApplyRequest {
                    diff: Some(descriptor(
                        layer.media_type().as_ref(),
                        layer.digest().as_ref(),
                        layer.size(),
                    )),
                    mounts,
                    payloads: HashMap::new(),
                    sync_fs: false,
                },
                Some(lease),
            ))
            .await
            .map_err(|status| UnpackError::from(ctr("Diff.Apply")(status)))
            .and_then(|response| {
                verify_applied(
                    layer.digest().as_ref(),
                    diff_id,
                    response.into_inner().applied.as_ref(),
                )
            });
        let committed = match applied {
            Ok(_) => snapshots
                .commit(store.request(
                    CommitSnapshotRequest {
                        snapshotter: SNAPSHOTTER.to_string(),
                        name: chain.clone(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    },
                    Some(lease),
                ))
                .await
                .map(|_| ())
                .or_else(|status| {
                    // Another process unpacked the same layer meanwhile: that is fine.
                    if status.code() == Code::AlreadyExists {
                        Ok(())
                    } else {
                        Err(ctr("Snapshots.Commit")(status).into())
                    }
                }),
            Err(e) => Err(e),
        };
        if let Err(error) = committed {
            let _ = snapshots
                .remove(store.request(
                    RemoveSnapshotRequest {
                        snapshotter: SNAPSHOTTER.to_string(),
                        key,
                    },
                    Some(lease),
                ))
                .await;
            return Err(error);
        }
        tracing::debug!(
            layer = %layer.digest(),
            compression = layer_compression(layer.media_type()).map_or("unknown", |c| c.as_str()),
            chain_id = %chain,
            "layer unpacked"
        );
    }
    Ok(())
}

/// Checks the descriptor `Diff.Apply` answered for `layer`: its digest is the uncompressed tar's,
/// which must be the config's `diff_id`.
fn verify_applied(
    layer: &str,
    diff_id: &str,
    applied: Option<&CtrDescriptor>,
) -> Result<(), UnpackError> {
    let actual = applied.map(|d| d.digest.as_str()).unwrap_or_default();
    if actual == diff_id {
        return Ok(());
    }
    Err(UnpackError::DiffIdMismatch {
        layer: layer.to_string(),
        expected: diff_id.to_string(),
        actual: if actual.is_empty() {
            "nothing (containerd named no digest)".to_string()
        } else {
            actual.to_string()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_applied_layer_must_unpack_to_its_diff_id() {
        let applied = descriptor("application/vnd.oci.image.layer.v1.tar", "sha256:tar", 10);
        assert!(verify_applied("sha256:zst", "sha256:tar", Some(&applied)).is_ok());
        let error = verify_applied("sha256:zst", "sha256:other", Some(&applied))
            .expect_err("a different tar digest is refused");
        assert!(
            matches!(&error, UnpackError::DiffIdMismatch { layer, expected, actual }
                if layer == "sha256:zst" && expected == "sha256:other" && actual == "sha256:tar"),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains("sha256:zst") && message.contains("sha256:other"),
            "{message}"
        );
        assert!(matches!(
            verify_applied("sha256:zst", "sha256:tar", None),
            Err(UnpackError::DiffIdMismatch { .. })
        ));
    }
}
