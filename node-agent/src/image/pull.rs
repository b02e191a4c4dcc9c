//! Pulls images into containerd 1.6 by hand (it has no Transfer service): the registry client
//! fetches manifest, config and layers; each blob is streamed into the content store (skipped when
//! already there); layers are unpacked into snapshots named by chain ID; GC labels tie the graph
//! together; the image record is created or updated. Everything runs under a containerd lease that
//! is deleted on every path. Pulls of the same image are serialised, so concurrent runs of one
//! image cause one download.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::GetImageRequest;
use futures::StreamExt;
use tonic::transport::Channel;

use crate::image::cache::containerd_name;
use crate::image::content::{descriptor, label, ContentError, ContentStore, SNAPSHOTTER};
use crate::image::manifest::{
    chain_ids, check_layer_media_types, host_platform, is_index, manifest_gc_labels, parse_config,
    parse_index, parse_manifest, select_platform, ImageRunConfig, ManifestError,
};
use crate::image::progress::{ProgressHub, PullProgressState};
use crate::image::registry::{Credentials, RegistryClient, RegistryError};
use crate::image::unpack::{unpack, UnpackError};
use berth_proto::v1::RegistryAuth;
use oci_client::Reference;

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

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// the image reference does not parse
    #[error("invalid image reference: {0}")]
    Reference(#[from] oci_client::ParseError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Content(#[from] ContentError),
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    /// a blob download broke off
    #[error("downloading {digest} failed: {message}")]
    Download { digest: String, message: String },
}

/// Pulls and unpacks images into one containerd namespace.
pub struct Puller {
    content: ContentStore,
    registry: RegistryClient,
    per_image: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// References (as the scheduler names them) pulled and unpacked by this process.
    cached: Mutex<std::collections::BTreeSet<String>>,
    /// Progress of the pull of each image (by containerd name).
    progress: ProgressHub,
    /// Recent answers to "which image is this reference, with these credentials", reused for
    /// `resolve_ttl` without asking containerd or the registry again (see [`Self::pull`]).
    resolved: Mutex<HashMap<ResolveKey, (std::time::Instant, PreparedImage)>>,
    resolve_ttl: std::time::Duration,
    /// Answers being re-checked in the background (see [`Self::refresh`]).
    refreshing: Mutex<std::collections::HashSet<ResolveKey>>,
}

/// The longest a background re-check of a resolved image may take.
const REFRESH_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The resolve-cache key of `image` asked with `auth`.
fn resolve_key(image: &str, auth: Option<&RegistryAuth>) -> Option<ResolveKey> {
    let reference: Reference = image.parse().ok()?;
    let name = reference.to_string();
    let credentials = credentials_for(&reference, auth);
    Some((
        containerd_name(&name),
        credentials.as_ref().map(credentials_fingerprint),
    ))
}

/// A reference (containerd's name for it) and who asks: a hash of the credentials, so an
/// answer given to one set of credentials is never reused for another (or for none).
type ResolveKey = (String, Option<[u8; 32]>);

fn credentials_fingerprint(credentials: &Credentials) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(credentials.username.as_bytes());
    hash.update([0]);
    hash.update(credentials.password.as_bytes());
    hash.finalize().into()
}

impl Puller {
    pub fn new(channel: Channel, namespace: String, registry: RegistryClient) -> Self {
        Self {
            content: ContentStore::new(channel, namespace),
            registry,
            per_image: Mutex::new(HashMap::new()),
            cached: Mutex::default(),
            progress: ProgressHub::default(),
            resolved: Mutex::default(),
            resolve_ttl: std::time::Duration::ZERO,
            refreshing: Mutex::default(),
        }
    }

    /// Reuses what a reference resolved to (the image's digest, its top snapshot and config)
    /// for `ttl` after a pull that checked it, per set of credentials: a run in that window
    /// asks neither containerd nor the registry. Zero (the default) checks on every run.
    pub fn with_resolve_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.resolve_ttl = ttl;
        self
    }

    /// The answer for `key` if it is younger than the TTL, and whether it is past half of it
    /// with no re-check going on (the caller then starts one, [`Self::refresh`]).
    fn recently_resolved(&self, key: &ResolveKey) -> Option<(PreparedImage, bool)> {
        let mut resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        match resolved.get(key) {
            Some((at, image)) if at.elapsed() < self.resolve_ttl => {
                let ageing = at.elapsed() >= self.resolve_ttl / 2
                    && self
                        .refreshing
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key.clone());
                Some((image.clone(), ageing))
            }
            Some(_) => {
                resolved.remove(key);
                None
            }
            None => None,
        }
    }

    /// containerd's image storage the puller writes to.
    pub(crate) fn content(&self) -> &ContentStore {
        &self.content
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

    /// The image containerd names `name` is gone: stop reporting every reference to it, and
    /// resolve it afresh next time.
    pub(crate) fn forget(&self, name: &str) {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached.retain(|image| containerd_name(image) != name);
        drop(cached);
        let mut resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
        resolved.retain(|(resolved_name, _), _| resolved_name != name);
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
        let listed = ImagesClient::new(self.content.channel.clone())
            .list(self.content.request(
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
        let (prepared, ageing) = self.pull_noting_age(image, auth).await?;
        if ageing {
            // No re-check follows this call: a later one may start it.
            if let Some(key) = resolve_key(image, auth) {
                self.refreshing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
            }
        }
        Ok(prepared)
    }

    /// [`Self::pull`], also saying whether the answer came from the resolve cache past half of
    /// its TTL: the caller should then [`Self::refresh`] it off the run's path.
    pub async fn pull_noting_age(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<(PreparedImage, bool), PullError> {
        let reference: Reference = image.parse()?;
        let name = reference.to_string();
        let credentials = credentials_for(&reference, auth);
        let gate = self.gate(&name);
        let _guard = gate.lock().await;
        let key = (
            containerd_name(&name),
            credentials.as_ref().map(credentials_fingerprint),
        );
        if !self.resolve_ttl.is_zero() {
            if let Some((image, ageing)) = self.recently_resolved(&key) {
                tracing::debug!(image = %name, digest = %image.digest, "image resolved moments ago");
                return Ok((image, ageing));
            }
        }
        let started = std::time::Instant::now();
        let result = self
            .pull_locked(&reference, &name, credentials.as_ref())
            .await;
        crate::metrics::image_pull(result.is_ok(), started.elapsed());
        if let Ok(prepared) = &result {
            self.cached
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(image.to_string());
            if !self.resolve_ttl.is_zero() {
                self.resolved
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, (started, prepared.clone()));
            }
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
        result.map(|image| (image, false))
    }

    /// Re-checks, off any run's path, what `image` resolved to for `auth` (one manifest GET,
    /// no containerd call, no pull lock): the same digest renews the answer for another TTL, so
    /// a steadily used tag is never resolved on a run's path; another digest or a refusal
    /// forgets it (the next run pulls as usual); an unreachable registry leaves it to expire.
    pub async fn refresh(&self, image: &str, auth: Option<&RegistryAuth>) {
        let (Ok(reference), Some(key)) = (image.parse::<Reference>(), resolve_key(image, auth))
        else {
            return;
        };
        let name = reference.to_string();
        let credentials = credentials_for(&reference, auth);
        let started = std::time::Instant::now();
        // Bounded, so a registry that hangs cannot keep this answer from being re-checked.
        let fetch = self
            .registry
            .fetch_manifest(&reference, credentials.as_ref());
        if let Ok(answer) = tokio::time::timeout(REFRESH_LIMIT, fetch).await {
            let mut resolved = self.resolved.lock().unwrap_or_else(|e| e.into_inner());
            match (answer, resolved.get_mut(&key)) {
                (Ok(top), Some((at, known))) if top.digest == known.digest => {
                    tracing::debug!(image = %name, digest = %top.digest, "image resolution renewed");
                    *at = started;
                }
                (Err(RegistryError::Unauthorized { .. }) | Ok(_), Some(_)) => {
                    tracing::info!(image = %name, "the tag moved or access changed; the next run resolves it again");
                    resolved.remove(&key);
                }
                (Err(error), _) => {
                    tracing::debug!(image = %name, %error, "re-checking the image failed; the answer expires as usual");
                }
                (Ok(_), None) => {}
            }
        } else {
            tracing::debug!(image = %name, "re-checking the image took too long; the answer expires as usual");
        }
        self.refreshing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    async fn pull_locked(
        &self,
        reference: &Reference,
        name: &str,
        credentials: Option<&Credentials>,
    ) -> Result<PreparedImage, PullError> {
        let local = self.local_image(name).await;
        if let (Some(local), Some(pinned)) = (&local, reference.digest()) {
            if local.digest == pinned {
                tracing::debug!(image = %name, "pinned image already present");
                return Ok(local.clone());
            }
        }
        // Resolve the tag (one manifest GET); blobs are only fetched when missing.
        let top = match self.registry.fetch_manifest(reference, credentials).await {
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
        let lease = self.content.create_lease().await?;
        let result = self
            .fetch_and_unpack(reference, name, top, &lease, credentials)
            .await;
        self.content.delete_lease(&lease).await;
        result
    }

    async fn fetch_and_unpack(
        &self,
        reference: &Reference,
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
                    .fetch_manifest(&reference.clone_with_digest(chosen.clone()), credentials)
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

        let config_bytes = match self.content.read_content(&config_digest).await {
            Some(bytes) => {
                progress.add_bytes(manifest.config().size());
                bytes
            }
            None => {
                let mut body = std::pin::pin!(
                    self.registry
                        .fetch_blob(reference, &config_digest, credentials)
                        .await?
                );
                let mut bytes = Vec::new();
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(|e| PullError::Download {
                        digest: config_digest.clone(),
                        message: e.to_string(),
                    })?;
                    bytes.extend_from_slice(chunk.as_ref());
                }
                progress.add_bytes(bytes.len() as u64);
                crate::metrics::image_bytes(bytes.len() as u64);
                bytes
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
                .content
                .ensure_labels_if_present(&digest, &labels, lease)
                .await?
            {
                progress.add_bytes(layer.size());
                progress.layer_done();
                continue;
            }
            let counter = progress.clone();
            let body = self
                .registry
                .fetch_blob(reference, &digest, credentials)
                .await?
                .inspect(move |chunk| {
                    if let Ok(chunk) = chunk {
                        counter.add_bytes(chunk.as_ref().len() as u64);
                        crate::metrics::image_bytes(chunk.as_ref().len() as u64);
                    }
                });
            self.content
                .write_blob(lease, &digest, layer.size(), labels, body)
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
        self.content
            .store_bytes(lease, &config_digest, config_bytes.clone(), config_labels)
            .await?;
        unpack(&self.content, layers, &diff_ids, &chains, lease).await?;
        self.content
            .store_bytes(
                lease,
                &manifest_digest,
                manifest_bytes.clone(),
                manifest_gc_labels(&manifest),
            )
            .await?;
        let target = match index_part {
            Some((position, chosen)) => {
                self.content
                    .store_bytes(
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
        self.content.put_image(name, target, lease).await?;
        Ok(PreparedImage {
            digest: top.digest,
            top_chain_id: top_chain,
            config: config.config().clone().unwrap_or_default(),
        })
    }

    /// The image as stored in containerd, if it is complete and unpacked.
    async fn local_image(&self, name: &str) -> Option<PreparedImage> {
        let image = ImagesClient::new(self.content.channel.clone())
            .get(self.content.request(
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
        let mut manifest_bytes = self.content.read_content(&target.digest).await?;
        if is_index(&target.media_type) {
            let index = parse_index(&manifest_bytes).ok()?;
            let (os, arch) = host_platform();
            let chosen = select_platform(&index, os, arch).ok()?;
            manifest_bytes = self.content.read_content(chosen.digest().as_ref()).await?;
        }
        let manifest = parse_manifest(&manifest_bytes).ok()?;
        let config = parse_config(
            &self
                .content
                .read_content(manifest.config().digest().as_ref())
                .await?,
        )
        .ok()?;
        let top_chain = chain_ids(config.rootfs().diff_ids()).last()?.clone();
        if !self.content.snapshot_exists(&top_chain).await {
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
fn credentials_for(reference: &Reference, auth: Option<&RegistryAuth>) -> Option<Credentials> {
    let auth = auth?;
    if auth.host != reference.registry() {
        tracing::warn!(
            image_registry = %reference.registry(),
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
