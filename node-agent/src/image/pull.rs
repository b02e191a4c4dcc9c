//! Pulls images into containerd 1.6 by hand (it has no Transfer service): the registry client
//! fetches manifest, config and layers; each blob is streamed into the content store (skipped when
//! already there); layers are unpacked into snapshots named by chain ID; GC labels tie the graph
//! together; the image record is created or updated. Everything runs under a containerd lease that
//! is deleted on every path. Pulls of the same image are serialised, so concurrent runs of one
//! image cause one download.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest,
    DeleteRequest as DeleteLeaseRequest, GetImageRequest, Image, InfoRequest, ReadContentRequest,
    UpdateImageRequest, UpdateRequest as UpdateContentRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor as CtrDescriptor;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::image::cache::containerd_name;
use crate::image::manifest::{
    chain_ids, check_layer_media_types, host_platform, is_index, layer_compression,
    manifest_gc_labels, parse_config, parse_index, parse_manifest, select_platform, ImageRunConfig,
    ManifestError,
};
use crate::image::progress::{ProgressHub, PullProgressState};
use crate::image::reference::{ImageReference, ReferenceError};
use crate::image::registry::{Credentials, RegistryClient, RegistryError};
use berth_proto::v1::RegistryAuth;
use oci_spec::image::Descriptor;

/// An image that is present and unpacked, ready to base a container on: what a pull gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedImage {
    /// The digest the reference resolved to (top-level manifest or index).
    pub digest: String,
    /// The chain ID of the top layer: the snapshot parent for containers.
    pub top_chain_id: String,
    /// Run defaults from the image config.
    pub config: ImageRunConfig,
}

/// The snapshotter every snapshot of the agent lives in.
pub const SNAPSHOTTER: &str = "overlayfs";
/// How long a pull lease may outlive a crashed agent before containerd collects it.
const LEASE_EXPIRY_SECS: u64 = 3600;

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// a containerd call failed
    #[error("containerd {operation} failed: {}", status.message())]
    Containerd {
        operation: &'static str,
        status: Status,
    },
    /// a blob download broke off
    #[error("downloading {digest} failed: {message}")]
    Download { digest: String, message: String },
    /// the uncompressed layer containerd applied is not the one the image config names
    #[error("layer {layer} unpacks to {actual}, but the image config says {expected}")]
    DiffIdMismatch {
        layer: String,
        expected: String,
        actual: String,
    },
}

fn ctr(operation: &'static str) -> impl FnOnce(Status) -> PullError {
    move |status| PullError::Containerd { operation, status }
}

/// Pulls and unpacks images into one containerd namespace.
pub struct Puller {
    pub(crate) channel: Channel,
    namespace: String,
    registry: RegistryClient,
    per_image: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// References (as the scheduler names them) pulled and unpacked by this process.
    cached: Mutex<std::collections::BTreeSet<String>>,
    /// Progress of the pull of each image (by containerd name).
    progress: ProgressHub,
}

impl Puller {
    pub fn new(channel: Channel, namespace: String, registry: RegistryClient) -> Self {
        Self {
            channel,
            namespace,
            registry,
            per_image: Mutex::new(HashMap::new()),
            cached: Mutex::default(),
            progress: ProgressHub::default(),
        }
    }

    /// Changes to the progress of pulls of `image` from now on.
    pub fn watch_progress(&self, image: &str) -> tokio::sync::watch::Receiver<PullProgressState> {
        self.progress.subscribe(&containerd_name(image))
    }

    /// The lock that serialises pulls of the image containerd names `name`; the image cache
    /// holds it while deleting the image.
    pub(crate) fn gate(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.per_image.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }

    /// The image containerd names `name` is gone: stop reporting every reference to it.
    pub(crate) fn forget(&self, name: &str) {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached.retain(|image| containerd_name(image) != name);
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

    /// The images this process has pulled (or found complete), for image-locality scoring.
    pub fn cached(&self) -> Vec<String> {
        let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached.iter().cloned().collect()
    }

    /// Adds every complete (present and unpacked) image of the namespace to [`Self::cached`], so
    /// a restarted agent reports what it already holds from its first heartbeat instead of
    /// only what it pulls again. Returns how many it found; errors only cost locality.
    pub async fn recall_cached(&self) -> usize {
        let listed = ImagesClient::new(self.channel.clone())
            .list(self.request(
                containerd_client::services::v1::ListImagesRequest { filters: vec![] },
                None,
            ))
            .await;
        let images = match listed {
            Ok(list) => list.into_inner().images,
            Err(error) => {
                tracing::warn!(%error, "cannot list the images already here");
                return 0;
            }
        };
        let mut found = 0;
        for image in images {
            if self.local_image(&image.name).await.is_some() {
                self.cached
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(image.name);
                found += 1;
            }
        }
        found
    }

    /// Makes `image` present and unpacked; concurrent calls for the same image wait for one pull.
    /// `auth` is used when it names the image's registry host.
    pub async fn pull(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<PreparedImage, PullError> {
        let reference = ImageReference::parse(image)?;
        let name = reference.to_string();
        let credentials = credentials_for(&reference, auth);
        let gate = self.gate(&name);
        let _guard = gate.lock().await;
        let started = std::time::Instant::now();
        let result = self
            .pull_locked(&reference, &name, credentials.as_ref())
            .await;
        if result.is_ok() {
            self.cached
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(image.to_string());
        }
        match &result {
            Ok(prepared) => tracing::info!(
                image = %name,
                digest = %prepared.digest,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "image ready"
            ),
            Err(error) => tracing::warn!(image = %name, %error, "image pull failed"),
        }
        result
    }

    async fn pull_locked(
        &self,
        reference: &ImageReference,
        name: &str,
        credentials: Option<&Credentials>,
    ) -> Result<PreparedImage, PullError> {
        let local = self.local_image(name).await;
        if let (Some(local), Some(pinned)) = (&local, &reference.digest) {
            if &local.digest == pinned {
                tracing::debug!(image = %name, "pinned image already present");
                return Ok(local.clone());
            }
        }
        // Resolve the tag (one manifest GET); blobs are only fetched when missing.
        let top = match self
            .registry
            .fetch_manifest(reference, reference.manifest_reference(), credentials)
            .await
        {
            Ok(top) => top,
            Err(error) => {
                // A refusal is an answer, not an outage: never run a local copy of an image the
                // run's credentials do not give access to.
                let refused = matches!(error, RegistryError::Unauthorized { .. });
                if let (Some(local), false) = (local, refused) {
                    tracing::warn!(image = %name, %error, "registry unreachable; using the local image");
                    return Ok(local);
                }
                return Err(error.into());
            }
        };
        if let Some(local) = local {
            if local.digest == top.digest {
                tracing::debug!(image = %name, digest = %top.digest, "image up to date");
                return Ok(local);
            }
        }
        let lease = self.create_lease().await?;
        let result = self
            .fetch_and_unpack(reference, name, top, &lease, credentials)
            .await;
        let mut leases = LeasesClient::new(self.channel.clone());
        if let Err(status) = leases
            .delete(self.request(
                DeleteLeaseRequest {
                    id: lease.clone(),
                    sync: false,
                },
                None,
            ))
            .await
        {
            tracing::warn!(lease = %lease, %status, "deleting pull lease failed");
        }
        result
    }

    async fn create_lease(&self) -> Result<String, PullError> {
        let id = format!("berth-pull-{}", uuid::Uuid::new_v4());
        let expire =
            std::time::SystemTime::now() + std::time::Duration::from_secs(LEASE_EXPIRY_SECS);
        let mut labels = HashMap::new();
        if let Some(expire) = rfc3339(expire) {
            labels.insert("containerd.io/gc.expire".to_string(), expire);
        }
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

    async fn fetch_and_unpack(
        &self,
        reference: &ImageReference,
        name: &str,
        top: crate::image::registry::FetchedManifest,
        lease: &str,
        credentials: Option<&Credentials>,
    ) -> Result<PreparedImage, PullError> {
        let (os, arch) = host_platform();
        let (manifest_bytes, manifest_digest, manifest_type, index_part) =
            if is_index(&top.media_type) {
                let index = parse_index(&top.bytes)?;
                let chosen = select_platform(&index, os, arch)?.clone();
                let position = index
                    .manifests()
                    .iter()
                    .position(|m| m.digest() == chosen.digest())
                    .unwrap_or(0);
                let chosen = chosen.digest().to_string();
                let fetched = self
                    .registry
                    .fetch_manifest(reference, &chosen, credentials)
                    .await?;
                (
                    fetched.bytes,
                    fetched.digest,
                    fetched.media_type,
                    Some((position, chosen)),
                )
            } else {
                (
                    top.bytes.clone(),
                    top.digest.clone(),
                    top.media_type.clone(),
                    None,
                )
            };
        let manifest = parse_manifest(&manifest_bytes)?;
        // Before any download: a layer containerd cannot apply fails the pull by its media type.
        check_layer_media_types(&manifest)?;
        let progress = self.progress.tracker(name);
        let config_digest = manifest.config().digest().to_string();
        let layers = manifest.layers();
        progress.begin(
            manifest.config().size() + layers.iter().map(|l| l.size()).sum::<u64>(),
            u32::try_from(layers.len()).unwrap_or(u32::MAX),
        );

        let config_bytes = match self.read_content(&config_digest).await {
            Some(bytes) => {
                progress.add_bytes(manifest.config().size());
                bytes
            }
            None => {
                let response = self
                    .registry
                    .fetch_blob(reference, &config_digest, credentials)
                    .await?;
                let bytes = response.bytes().await.map_err(|e| PullError::Download {
                    digest: config_digest.clone(),
                    message: e.to_string(),
                })?;
                progress.add_bytes(bytes.len() as u64);
                bytes.to_vec()
            }
        };
        let config = parse_config(&config_bytes)?;
        let diff_ids = config.rootfs().diff_ids().clone();
        if diff_ids.len() != layers.len() {
            return Err(ManifestError::LayerCountMismatch {
                diff_ids: diff_ids.len(),
                layers: layers.len(),
            }
            .into());
        }
        let chains = chain_ids(&diff_ids);
        let top_chain = chains.last().cloned().unwrap_or_default();

        for (layer, diff_id) in layers.iter().zip(&diff_ids) {
            let digest = layer.digest().to_string();
            let labels = label("containerd.io/uncompressed", diff_id);
            if self
                .ensure_labels_if_present(&digest, &labels, lease)
                .await?
            {
                progress.add_bytes(layer.size());
                progress.layer_done();
                continue;
            }
            let response = self
                .registry
                .fetch_blob(reference, &digest, credentials)
                .await?;
            let counter = progress.clone();
            let body = response.bytes_stream().inspect(move |chunk| {
                if let Ok(chunk) = chunk {
                    counter.add_bytes(chunk.len() as u64);
                }
            });
            self.write_blob(lease, &digest, layer.size(), labels, body)
                .await?;
            progress.layer_done();
        }
        progress.complete();
        let mut config_labels = HashMap::new();
        if !top_chain.is_empty() {
            config_labels.insert(
                format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
                top_chain.clone(),
            );
        }
        self.store_bytes(lease, &config_digest, config_bytes.clone(), config_labels)
            .await?;
        self.unpack(layers, &diff_ids, &chains, lease).await?;
        self.store_bytes(
            lease,
            &manifest_digest,
            manifest_bytes.clone(),
            manifest_gc_labels(&manifest),
        )
        .await?;
        let target = match index_part {
            Some((position, chosen)) => {
                self.store_bytes(
                    lease,
                    &top.digest,
                    top.bytes.clone(),
                    label(
                        &format!("containerd.io/gc.ref.content.m.{position}"),
                        &chosen,
                    ),
                )
                .await?;
                descriptor(&top.media_type, &top.digest, top.bytes.len() as u64)
            }
            None => descriptor(
                &manifest_type,
                &manifest_digest,
                manifest_bytes.len() as u64,
            ),
        };
        self.put_image(name, target, lease).await?;
        Ok(PreparedImage {
            digest: top.digest,
            top_chain_id: top_chain,
            config: config.config().clone().unwrap_or_default(),
        })
    }

    async fn put_image(
        &self,
        name: &str,
        target: CtrDescriptor,
        lease: &str,
    ) -> Result<(), PullError> {
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

    /// Applies every layer whose chain-ID snapshot does not exist yet. containerd decompresses
    /// the layer (gzip, zstd or none, by its media type) and reports the digest of the tar it
    /// applied; that must be the layer's diff ID, or the snapshot would be named by a chain ID
    /// that is not its content's.
    async fn unpack(
        &self,
        layers: &[Descriptor],
        diff_ids: &[String],
        chains: &[String],
        lease: &str,
    ) -> Result<(), PullError> {
        let mut snapshots = SnapshotsClient::new(self.channel.clone());
        let mut diff = DiffClient::new(self.channel.clone());
        for (i, ((layer, diff_id), chain)) in layers.iter().zip(diff_ids).zip(chains).enumerate() {
            if self.snapshot_exists(chain).await {
                continue;
            }
            let parent = if i == 0 {
                String::new()
            } else {
                chains[i - 1].clone()
            };
            let key = format!("berth-extract-{}-{chain}", uuid::Uuid::new_v4().simple());
            let mounts = snapshots
                .prepare(self.request(
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
                .apply(self.request(
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
                .map_err(ctr("Diff.Apply"))
                .and_then(|response| {
                    verify_applied(
                        layer.digest().as_ref(),
                        diff_id,
                        response.into_inner().applied.as_ref(),
                    )
                });
            let committed = match applied {
                Ok(_) => snapshots
                    .commit(self.request(
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
                            Err(ctr("Snapshots.Commit")(status))
                        }
                    }),
                Err(e) => Err(e),
            };
            if let Err(error) = committed {
                let _ = snapshots
                    .remove(self.request(
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

    async fn snapshot_exists(&self, key: &str) -> bool {
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
    async fn ensure_labels_if_present(
        &self,
        digest: &str,
        labels: &HashMap<String, String>,
        lease: &str,
    ) -> Result<bool, PullError> {
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

    async fn store_bytes(
        &self,
        lease: &str,
        digest: &str,
        bytes: Vec<u8>,
        labels: HashMap<String, String>,
    ) -> Result<(), PullError> {
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
    async fn write_blob<S, B, E>(
        &self,
        lease: &str,
        digest: &str,
        size: u64,
        labels: HashMap<String, String>,
        body: S,
    ) -> Result<(), PullError>
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
                return Err(PullError::Download {
                    digest: digest.to_string(),
                    message: fed
                        .err()
                        .unwrap_or_else(|| "write ended without commit".into()),
                })
            }
            Err(status) => {
                if let Err(message) = fed {
                    return Err(PullError::Download {
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

    /// The image as stored in containerd, if it is complete and unpacked.
    async fn local_image(&self, name: &str) -> Option<PreparedImage> {
        let image = ImagesClient::new(self.channel.clone())
            .get(self.request(
                GetImageRequest {
                    name: name.to_string(),
                },
                None,
            ))
            .await
            .ok()?
            .into_inner()
            .image?;
        let target = image.target?;
        let mut manifest_bytes = self.read_content(&target.digest).await?;
        if is_index(&target.media_type) {
            let index = parse_index(&manifest_bytes).ok()?;
            let (os, arch) = host_platform();
            let chosen = select_platform(&index, os, arch).ok()?;
            manifest_bytes = self.read_content(chosen.digest().as_ref()).await?;
        }
        let manifest = parse_manifest(&manifest_bytes).ok()?;
        let config = parse_config(
            &self
                .read_content(manifest.config().digest().as_ref())
                .await?,
        )
        .ok()?;
        let top_chain = chain_ids(config.rootfs().diff_ids()).last()?.clone();
        if !self.snapshot_exists(&top_chain).await {
            return None;
        }
        Some(PreparedImage {
            digest: target.digest,
            top_chain_id: top_chain,
            config: config.config().clone().unwrap_or_default(),
        })
    }
}

/// The run's credentials, when they are for the image's registry. Credentials for another host
/// are ignored (never sent to a registry they were not meant for).
fn credentials_for(reference: &ImageReference, auth: Option<&RegistryAuth>) -> Option<Credentials> {
    let auth = auth?;
    if auth.host != reference.registry {
        tracing::warn!(
            image_registry = %reference.registry,
            credentials_host = %auth.host,
            "registry credentials are for another host; pulling without them"
        );
        return None;
    }
    Some(Credentials {
        username: auth.username.clone(),
        password: auth.password.clone(),
    })
}

/// Checks the descriptor `Diff.Apply` answered for `layer`: its digest is the uncompressed tar's,
/// which must be the config's `diff_id`.
fn verify_applied(
    layer: &str,
    diff_id: &str,
    applied: Option<&CtrDescriptor>,
) -> Result<(), PullError> {
    let actual = applied.map(|d| d.digest.as_str()).unwrap_or_default();
    if actual == diff_id {
        return Ok(());
    }
    Err(PullError::DiffIdMismatch {
        layer: layer.to_string(),
        expected: diff_id.to_string(),
        actual: if actual.is_empty() {
            "nothing (containerd named no digest)".to_string()
        } else {
            actual.to_string()
        },
    })
}

fn label(key: &str, value: &str) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    labels.insert(key.to_string(), value.to_string());
    labels
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> CtrDescriptor {
    CtrDescriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size: i64::try_from(size).unwrap_or(i64::MAX),
        annotations: HashMap::new(),
    }
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
    fn an_applied_layer_must_unpack_to_its_diff_id() {
        let applied = descriptor("application/vnd.oci.image.layer.v1.tar", "sha256:tar", 10);
        assert!(verify_applied("sha256:zst", "sha256:tar", Some(&applied)).is_ok());
        let error = verify_applied("sha256:zst", "sha256:other", Some(&applied))
            .expect_err("a different tar digest is refused");
        assert!(
            matches!(&error, PullError::DiffIdMismatch { layer, expected, actual }
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
            Err(PullError::DiffIdMismatch { .. })
        ));
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(0);
        assert_eq!(rfc3339(at).as_deref(), Some("1970-01-01T00:00:00Z"));
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_709_251_199_750);
        assert_eq!(rfc3339(at).as_deref(), Some("2024-02-29T23:59:59Z"));
    }
}
