//! The node's image cache policy: keep the images on disk within a byte budget
//! (`--image-cache-bytes`), deleting the least recently used ones that nothing needs.
//!
//! - **Size** of the cache: every distinct piece of disk the images in the agent's containerd
//!   namespace occupy, counted once however many images share it — content-store blobs
//!   (index, manifest, config, compressed layers, as stored) plus the unpacked layer snapshots
//!   (containerd's `Snapshots.Usage` of each chain ID). The writable snapshots of runs are not
//!   counted (they go with the run).
//! - **Last use**: a pull or a run start (every run's pull step, even when the image is present)
//!   stamps the image's containerd label `berth.dev/last-used` (unix millis), so the order
//!   survives agent restarts; an image without it counts by its `updated_at`.
//! - **Never deleted**: an image that a run of this agent uses (from assignment until the run
//!   has ended and been cleaned up) or that a warmup pinned on this node (the set the scheduler
//!   sends in `WarmPins`). Until the first `WarmPins` arrives nothing is deleted.
//! - **When**: after every pull and every run's end, one pass at a time (requests during a pass
//!   fold into one more pass). A pass deletes images in least-recently-used order until the
//!   cache fits the budget (or only needed images are left); each delete runs under the image's
//!   pull gate, re-checks that nothing needs the image, and asks containerd for a synchronous
//!   garbage collection, so its blobs and snapshots are gone when it returns (pieces shared
//!   with kept images stay).
//!
//! [`select_evictions`] is the pure policy; [`ImageStore`] is the world (containerd in
//! `image_store.rs`, a fake in the tests).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, OwnedMutexGuard};

use oci_client::Reference;

/// containerd label holding an image's last use, unix millis.
pub const LAST_USED_LABEL: &str = "berth.dev/last-used";
/// Default `--image-cache-bytes`: 20 GiB.
pub const DEFAULT_IMAGE_CACHE_BYTES: u64 = 20 << 30;

/// One piece of disk an image occupies (`content:<digest>` or `snapshot:<chain id>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Part {
    pub key: String,
    pub bytes: u64,
}

/// An image in the cache, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedImage {
    /// containerd's image name (the normalised reference).
    pub name: String,
    pub last_used_millis: i64,
    pub parts: Vec<Part>,
}

/// Bytes the images occupy together, each shared part counted once.
pub fn total_bytes(images: &[CachedImage]) -> u64 {
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for part in images.iter().flat_map(|i| &i.parts) {
        seen.insert(&part.key, part.bytes);
    }
    seen.values().sum()
}

/// The images to delete, in order: least recently used first (ties by name), skipping every
/// image `keep` names, until what is left fits `budget`. Deleting an image frees only the parts
/// no remaining image shares.
pub fn select_evictions(
    images: &[CachedImage],
    budget: u64,
    keep: &dyn Fn(&str) -> bool,
) -> Vec<String> {
    let mut users: HashMap<&str, (u64, usize)> = HashMap::new();
    for image in images {
        let distinct: BTreeSet<&Part> = image.parts.iter().collect();
        for part in distinct {
            users.entry(&part.key).or_insert((part.bytes, 0)).1 += 1;
        }
    }
    let mut total: u64 = users.values().map(|(bytes, _)| bytes).sum();
    let mut candidates: Vec<&CachedImage> = images.iter().filter(|i| !keep(&i.name)).collect();
    candidates.sort_by(|a, b| (a.last_used_millis, &a.name).cmp(&(b.last_used_millis, &b.name)));
    let mut evicted = Vec::new();
    for image in candidates {
        if total <= budget {
            break;
        }
        let distinct: BTreeSet<&str> = image.parts.iter().map(|p| p.key.as_str()).collect();
        for key in distinct {
            if let Some((bytes, count)) = users.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    total = total.saturating_sub(*bytes);
                }
            }
        }
        evicted.push(image.name.clone());
    }
    evicted
}

/// The name containerd knows an image by (what the puller creates); unparsable references are
/// kept as they are.
pub fn containerd_name(image: &str) -> String {
    image
        .parse::<Reference>()
        .map_or_else(|_| image.to_string(), |r| r.to_string())
}

/// Why a cache operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    /// a containerd call failed
    #[error("containerd {operation} failed: {message}")]
    Containerd {
        operation: &'static str,
        message: String,
    },
}

/// What the cache needs from the image store.
pub trait ImageStore: Send + Sync + 'static {
    /// Every image in the namespace with its parts and last use.
    fn list(&self) -> impl Future<Output = Result<Vec<CachedImage>, CacheError>> + Send;
    /// Records a use of image `name` at `at_millis`.
    fn touch(
        &self,
        name: &str,
        at_millis: i64,
    ) -> impl Future<Output = Result<(), CacheError>> + Send;
    /// Deletes image `name` and waits for the garbage collection of what only it used.
    fn delete(&self, name: &str) -> impl Future<Output = Result<(), CacheError>> + Send;
    /// Serialises with pulls of `name`: held while deleting it.
    fn gate(&self, name: &str) -> impl Future<Output = OwnedMutexGuard<()>> + Send;
}

#[derive(Debug, Default)]
struct Needs {
    /// None until the scheduler sent the first pin set.
    pins: Option<BTreeSet<String>>,
    /// run id → containerd name of its image.
    runs: HashMap<String, String>,
}

impl Needs {
    fn keeps(&self, name: &str) -> bool {
        self.pins.as_ref().is_some_and(|p| p.contains(name))
            || self.runs.values().any(|n| n == name)
    }
}

/// The cache: who needs which image, and the garbage-collection passes.
pub struct ImageCache<S> {
    store: Arc<S>,
    budget_bytes: u64,
    needs: Mutex<Needs>,
    /// One pass at a time.
    pass: tokio::sync::Mutex<()>,
    wake: Notify,
}

impl<S: ImageStore> ImageCache<S> {
    pub fn new(store: Arc<S>, budget_bytes: u64) -> Self {
        Self {
            store,
            budget_bytes,
            needs: Mutex::default(),
            pass: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
        }
    }

    fn needs(&self) -> MutexGuard<'_, Needs> {
        self.needs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `run_id` uses `image` until [`Self::release`].
    pub fn hold(&self, run_id: &str, image: &str) {
        self.needs()
            .runs
            .insert(run_id.to_string(), containerd_name(image));
    }

    /// The run ended and was cleaned up; a pass follows.
    pub fn release(&self, run_id: &str) {
        self.needs().runs.remove(run_id);
        self.request_collect();
    }

    /// The node's whole warm-pin set (from the scheduler); a pass follows.
    pub fn set_pins(&self, images: &[String]) {
        let pins = images.iter().map(|i| containerd_name(i)).collect();
        self.needs().pins = Some(pins);
        self.request_collect();
    }

    /// `image` was just pulled or used by a run: stamp it; a pass follows.
    pub async fn used(&self, image: &str) {
        let name = containerd_name(image);
        if let Err(error) = self.store.touch(&name, berth_core::now_unix_millis()).await {
            tracing::warn!(image = %name, %error, "recording the image's last use failed");
        }
        self.request_collect();
    }

    /// Asks the background loop ([`Self::run`]) for a pass.
    pub fn request_collect(&self) {
        self.wake.notify_one();
    }

    /// Runs a pass whenever one is requested, forever.
    pub async fn run(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            if let Err(error) = self.collect().await {
                tracing::warn!(%error, "image cache pass failed");
            }
        }
    }

    /// One pass: deletes least-recently-used images nothing needs until the cache fits the
    /// budget. Returns the names deleted.
    pub async fn collect(&self) -> Result<Vec<String>, CacheError> {
        let _pass = self.pass.lock().await;
        if self.needs().pins.is_none() {
            tracing::debug!("image cache pass skipped: warm pins not known yet");
            return Ok(Vec::new());
        }
        let images = self.store.list().await?;
        let total = total_bytes(&images);
        let victims = {
            let needs = self.needs();
            select_evictions(&images, self.budget_bytes, &|name| needs.keeps(name))
        };
        if victims.is_empty() {
            if total > self.budget_bytes {
                tracing::warn!(
                    total_bytes = total,
                    budget_bytes = self.budget_bytes,
                    "image cache over budget, but every image is in use or pinned"
                );
            }
            return Ok(Vec::new());
        }
        let mut deleted = Vec::new();
        for name in victims {
            let _gate = self.store.gate(&name).await;
            if self.needs().keeps(&name) {
                continue; // a run or a pin claimed it meanwhile
            }
            match self.store.delete(&name).await {
                Ok(()) => {
                    tracing::info!(image = %name, total_bytes = total, budget_bytes = self.budget_bytes, "image evicted from the cache");
                    deleted.push(name);
                }
                Err(error) => tracing::warn!(image = %name, %error, "evicting an image failed"),
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn image(name: &str, last_used: i64, parts: &[(&str, u64)]) -> CachedImage {
        CachedImage {
            name: name.to_string(),
            last_used_millis: last_used,
            parts: parts
                .iter()
                .map(|(k, b)| Part {
                    key: k.to_string(),
                    bytes: *b,
                })
                .collect(),
        }
    }

    #[test]
    fn evicts_least_recently_used_until_under_budget() {
        let images = [
            image("c", 30, &[("c", 10)]),
            image("a", 10, &[("a", 10)]),
            image("b", 20, &[("b", 10)]),
        ];
        assert_eq!(
            select_evictions(&images, 30, &|_| false),
            Vec::<String>::new()
        );
        assert_eq!(select_evictions(&images, 25, &|_| false), ["a"]);
        assert_eq!(select_evictions(&images, 10, &|_| false), ["a", "b"]);
        assert_eq!(select_evictions(&images, 0, &|_| false), ["a", "b", "c"]);
    }

    #[test]
    fn pinned_and_in_use_images_are_never_evicted() {
        let images = [
            image("a", 10, &[("a", 10)]),
            image("b", 20, &[("b", 10)]),
            image("c", 30, &[("c", 10)]),
        ];
        // a is the least recently used but kept: b goes instead.
        assert_eq!(select_evictions(&images, 20, &|n| n == "a"), ["b"]);
        // Everything kept: nothing to do even far over budget.
        assert!(select_evictions(&images, 0, &|_| true).is_empty());
    }

    #[test]
    fn shared_parts_count_once_and_free_nothing_while_shared() {
        let images = [
            image("a", 10, &[("base", 50), ("a", 10)]),
            image("b", 20, &[("base", 50), ("b", 10)]),
        ];
        assert_eq!(total_bytes(&images), 70);
        // Deleting a frees only its own 10 bytes: 60 fits.
        assert_eq!(select_evictions(&images, 60, &|_| false), ["a"]);
        // 55 needs both gone.
        assert_eq!(select_evictions(&images, 55, &|_| false), ["a", "b"]);
    }

    #[test]
    fn ties_in_last_use_go_by_name() {
        let images = [image("b", 5, &[("b", 1)]), image("a", 5, &[("a", 1)])];
        assert_eq!(select_evictions(&images, 1, &|_| false), ["a"]);
    }

    fn arb_images() -> impl Strategy<Value = Vec<CachedImage>> {
        prop::collection::vec((0i64..20, prop::collection::btree_set(0u8..12, 1..4)), 0..8)
            .prop_map(|specs| {
                specs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (last_used, keys))| CachedImage {
                        name: format!("img{i}"),
                        last_used_millis: last_used,
                        parts: keys
                            .into_iter()
                            // A part's size is a function of its key, as on disk.
                            .map(|k| Part {
                                key: format!("p{k}"),
                                bytes: u64::from(k) * 7 + 3,
                            })
                            .collect(),
                    })
                    .collect()
            })
    }

    proptest! {
        /// Kept images are never chosen; what is left fits the budget unless only kept images
        /// remain; the choice is a least-recently-used prefix of the candidates; and no image is
        /// evicted once the budget is met.
        #[test]
        fn eviction_properties(images in arb_images(), budget in 0u64..400, kept in prop::collection::btree_set(0usize..8, 0..3)) {
            let kept: BTreeSet<String> = kept.into_iter().map(|i| format!("img{i}")).collect();
            let evicted = select_evictions(&images, budget, &|n| kept.contains(n));
            prop_assert!(evicted.iter().all(|n| !kept.contains(n)));
            let left: Vec<CachedImage> = images.iter().filter(|i| !evicted.contains(&i.name)).cloned().collect();
            let candidates_left = left.iter().any(|i| !kept.contains(&i.name));
            prop_assert!(total_bytes(&left) <= budget || !candidates_left);
            let mut order: Vec<&CachedImage> = images.iter().filter(|i| !kept.contains(&i.name)).collect();
            order.sort_by(|a, b| (a.last_used_millis, &a.name).cmp(&(b.last_used_millis, &b.name)));
            let prefix: Vec<String> = order.iter().take(evicted.len()).map(|i| i.name.clone()).collect();
            prop_assert_eq!(&evicted, &prefix);
            if let Some((_, before_last)) = evicted.split_last() {
                let without: Vec<CachedImage> = images.iter().filter(|i| !before_last.contains(&i.name)).cloned().collect();
                prop_assert!(total_bytes(&without) > budget, "evicted one image too many");
            }
        }
    }

    /// A fake store: images in memory, deletes recorded.
    #[derive(Default)]
    struct FakeStore {
        images: Mutex<Vec<CachedImage>>,
        deleted: Mutex<Vec<String>>,
        gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    }

    impl ImageStore for FakeStore {
        async fn list(&self) -> Result<Vec<CachedImage>, CacheError> {
            Ok(self
                .images
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone())
        }
        async fn touch(&self, name: &str, at_millis: i64) -> Result<(), CacheError> {
            let mut images = self.images.lock().unwrap_or_else(|e| e.into_inner());
            for image in images.iter_mut().filter(|i| i.name == name) {
                image.last_used_millis = at_millis;
            }
            Ok(())
        }
        async fn delete(&self, name: &str) -> Result<(), CacheError> {
            self.images
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|i| i.name != name);
            self.deleted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(name.to_string());
            Ok(())
        }
        async fn gate(&self, name: &str) -> OwnedMutexGuard<()> {
            let gate = self
                .gates
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(name.to_string())
                .or_default()
                .clone();
            gate.lock_owned().await
        }
    }

    const A: &str = "127.0.0.1:5001/a:latest";
    const B: &str = "127.0.0.1:5001/b:latest";
    const C: &str = "127.0.0.1:5001/c:latest";

    fn cache_of(images: Vec<CachedImage>, budget: u64) -> (Arc<FakeStore>, ImageCache<FakeStore>) {
        let store = Arc::new(FakeStore {
            images: Mutex::new(images),
            ..Default::default()
        });
        (store.clone(), ImageCache::new(store, budget))
    }

    #[tokio::test]
    async fn nothing_is_deleted_before_the_pins_are_known() {
        let (store, cache) = cache_of(vec![image(A, 1, &[("a", 10)])], 0);
        assert!(cache.collect().await.expect("pass").is_empty());
        cache.set_pins(&[]);
        assert_eq!(cache.collect().await.expect("pass"), [A]);
        assert_eq!(*store.deleted.lock().expect("lock"), [A]);
    }

    #[tokio::test]
    async fn runs_and_pins_keep_their_images_until_released() {
        let (store, cache) = cache_of(
            vec![
                image(A, 1, &[("a", 10)]),
                image(B, 2, &[("b", 10)]),
                image(C, 3, &[("c", 10)]),
            ],
            10,
        );
        // Names as the scheduler sends them normalise to containerd's.
        cache.set_pins(&["127.0.0.1:5001/a:latest".to_string()]);
        cache.hold("run-1", "127.0.0.1:5001/b:latest");
        assert_eq!(cache.collect().await.expect("pass"), [C]);
        cache.release("run-1");
        assert_eq!(cache.collect().await.expect("pass"), [B]);
        cache.set_pins(&[]);
        assert!(
            cache.collect().await.expect("pass").is_empty(),
            "10 bytes fit"
        );
        assert_eq!(*store.deleted.lock().expect("lock"), [C, B]);
    }

    #[tokio::test]
    async fn a_use_makes_an_image_the_most_recent() {
        let (_store, cache) = cache_of(
            vec![image(A, 1, &[("a", 10)]), image(B, 2, &[("b", 10)])],
            10,
        );
        cache.set_pins(&[]);
        cache.used(A).await;
        assert_eq!(cache.collect().await.expect("pass"), [B]);
    }
}
