//! Images: from a reference the scheduler sends to a present, unpacked image in containerd, and
//! the cache that keeps the node's disk within budget.
//!
//! - [`reference`]: image references (`127.0.0.1:5001/busybox:latest`, `…@sha256:…`).
//! - [`registry`]: the registry (OCI distribution) client: manifests, blobs, basic and bearer auth.
//! - [`manifest`]: manifests, indexes and configs (OCI and Docker v2), platform choice, chain IDs.
//! - [`pull`]: the pull itself: blobs streamed into containerd's content store, layers unpacked
//!   into snapshots named by chain ID, GC labels, the image record.
//! - [`progress`]: bytes and layers fetched per pull, shared by every run waiting on it.
//! - [`cache`]: the LRU policy over `--image-cache-bytes` (pure, behind the `ImageStore` trait).
//! - [`store`]: the cache's containerd side (`ImageStore` over the image records and content).

pub mod cache;
pub mod manifest;
pub mod progress;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod store;
