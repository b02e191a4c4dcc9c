//! The real [`ImageStore`]: the images of the agent's containerd namespace. An image's parts
//! are its stored blobs (index, chosen manifest, config, layers: `Content.Info` sizes) and its
//! layer snapshots (`Snapshots.Usage` by chain ID); they are computed once per image target and
//! remembered (blobs and committed snapshots never change). Deleting goes through
//! `Images.Delete` with `sync`, so containerd's garbage collection has removed everything only
//! that image used when the call returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::UsageRequest;
use containerd_client::services::v1::{
    DeleteImageRequest, GetImageRequest, Image, InfoRequest, ListImagesRequest, UpdateImageRequest,
};
use tokio::sync::OwnedMutexGuard;
use tonic::{Code, Status};

use crate::image::cache::{CacheError, CachedImage, ImageStore, Part, LAST_USED_LABEL};
use crate::image::content::SNAPSHOTTER;
use crate::image::manifest::{
    chain_ids, host_platform, is_index, parse_config, parse_index, parse_manifest, select_platform,
};
use crate::image::pull::Puller;

fn ctr(operation: &'static str) -> impl FnOnce(Status) -> CacheError {
    move |status| CacheError::Containerd {
        operation,
        message: status.message().to_string(),
    }
}

/// The images the puller put into containerd.
pub struct ContainerdImages {
    puller: Arc<Puller>,
    /// Parts per image target digest, once complete.
    parts: Mutex<HashMap<String, Vec<Part>>>,
}

impl ContainerdImages {
    pub fn new(puller: Arc<Puller>) -> Self {
        Self {
            puller,
            parts: Mutex::default(),
        }
    }

    async fn content_size(&self, digest: &str) -> Option<u64> {
        let info = ContentClient::new(self.puller.content().channel.clone())
            .info(self.puller.content().request(
                InfoRequest {
                    digest: digest.to_string(),
                },
                None,
            ))
            .await
            .ok()?
            .into_inner()
            .info?;
        u64::try_from(info.size).ok()
    }

    async fn snapshot_usage(&self, chain_id: &str) -> Option<u64> {
        let usage = SnapshotsClient::new(self.puller.content().channel.clone())
            .usage(self.puller.content().request(
                UsageRequest {
                    snapshotter: SNAPSHOTTER.to_string(),
                    key: chain_id.to_string(),
                },
                None,
            ))
            .await
            .ok()?
            .into_inner();
        u64::try_from(usage.size).ok()
    }

    /// The parts of the image whose target is `digest` (`media_type`), and whether every one
    /// was found (only then are they remembered).
    async fn parts_of(&self, digest: &str, media_type: &str) -> (Vec<Part>, bool) {
        let mut parts = Vec::new();
        let mut complete = true;
        let mut add = |key: String, size: Option<u64>| match size {
            Some(bytes) => parts.push(Part { key, bytes }),
            None => complete = false,
        };
        add(format!("content:{digest}"), self.content_size(digest).await);
        let Some(mut manifest_bytes) = self.puller.content().read_content(digest).await else {
            return (parts, false);
        };
        if is_index(media_type) {
            let (os, arch) = host_platform();
            let chosen = parse_index(&manifest_bytes)
                .ok()
                .and_then(|index| select_platform(&index, os, arch).ok().cloned());
            let Some(chosen) = chosen else {
                return (parts, false);
            };
            add(
                format!("content:{}", chosen.digest()),
                self.content_size(chosen.digest().as_ref()).await,
            );
            match self
                .puller
                .content()
                .read_content(chosen.digest().as_ref())
                .await
            {
                Some(bytes) => manifest_bytes = bytes,
                None => return (parts, false),
            }
        }
        let Ok(manifest) = parse_manifest(&manifest_bytes) else {
            return (parts, false);
        };
        for blob in std::iter::once(manifest.config()).chain(manifest.layers()) {
            add(
                format!("content:{}", blob.digest()),
                self.content_size(blob.digest().as_ref()).await,
            );
        }
        let config = match self
            .puller
            .content()
            .read_content(manifest.config().digest().as_ref())
            .await
        {
            Some(bytes) => parse_config(&bytes).ok(),
            None => None,
        };
        let Some(config) = config else {
            return (parts, false);
        };
        for chain in chain_ids(config.rootfs().diff_ids()) {
            let usage = self.snapshot_usage(&chain).await;
            add(format!("snapshot:{chain}"), usage);
        }
        (parts, complete)
    }
}

fn last_used_millis(image: &Image) -> i64 {
    image
        .labels
        .get(LAST_USED_LABEL)
        .and_then(|v| v.parse().ok())
        .or_else(|| {
            image
                .updated_at
                .as_ref()
                .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        })
        .unwrap_or(0)
}

impl ImageStore for ContainerdImages {
    async fn list(&self) -> Result<Vec<CachedImage>, CacheError> {
        let images = ImagesClient::new(self.puller.content().channel.clone())
            .list(
                self.puller
                    .content()
                    .request(ListImagesRequest { filters: vec![] }, None),
            )
            .await
            .map_err(ctr("Images.List"))?
            .into_inner()
            .images;
        let mut out = Vec::with_capacity(images.len());
        for image in images {
            let Some(target) = image.target.clone() else {
                continue;
            };
            let known = self
                .parts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&target.digest)
                .cloned();
            let parts = match known {
                Some(parts) => parts,
                None => {
                    let (parts, complete) = self.parts_of(&target.digest, &target.media_type).await;
                    if complete {
                        self.parts
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(target.digest.clone(), parts.clone());
                    }
                    parts
                }
            };
            out.push(CachedImage {
                last_used_millis: last_used_millis(&image),
                name: image.name,
                parts,
            });
        }
        Ok(out)
    }

    async fn touch(&self, name: &str, at_millis: i64) -> Result<(), CacheError> {
        let mut images = ImagesClient::new(self.puller.content().channel.clone());
        let current = images
            .get(self.puller.content().request(
                GetImageRequest {
                    name: name.to_string(),
                },
                None,
            ))
            .await;
        let mut image = match current {
            Ok(response) => match response.into_inner().image {
                Some(image) => image,
                None => return Ok(()),
            },
            Err(status) if status.code() == Code::NotFound => return Ok(()),
            Err(status) => return Err(ctr("Images.Get")(status)),
        };
        image
            .labels
            .insert(LAST_USED_LABEL.to_string(), at_millis.to_string());
        images
            .update(self.puller.content().request(
                UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec![format!("labels.{LAST_USED_LABEL}")],
                    }),
                    source_date_epoch: None,
                },
                None,
            ))
            .await
            .map_err(ctr("Images.Update"))?;
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<(), CacheError> {
        let result = ImagesClient::new(self.puller.content().channel.clone())
            .delete(self.puller.content().request(
                DeleteImageRequest {
                    name: name.to_string(),
                    sync: true,
                    target: None,
                },
                None,
            ))
            .await;
        match result {
            Ok(_) => {}
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => return Err(ctr("Images.Delete")(status)),
        }
        self.puller.forget(name);
        Ok(())
    }

    async fn gate(&self, name: &str) -> OwnedMutexGuard<()> {
        self.puller.gate(name).lock_owned().await
    }
}
