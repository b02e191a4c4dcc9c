//! Images: from a reference the scheduler sends to a present, unpacked image in containerd, and
//! the cache that keeps the node's disk within budget.
//!
//! - [`registry`]: the registry side, over `oci-client` (which also parses image references):
//!   raw manifests, streamed blobs, basic and bearer auth, one client per credentials.
//! - [`manifest`]: manifests, indexes and configs (OCI and Docker v2), platform choice, chain IDs.
//! - [`pull`]: the pull itself: resolve the reference, fetch what is missing, unpack, record the
//!   image; one pull per image at a time.
//! - [`content`]: containerd's image storage: blobs streamed into the content store with their
//!   GC labels, snapshots, pull leases, image records.
//! - [`unpack`]: layers applied into snapshots named by chain ID, diff IDs verified.
//! - [`progress`]: bytes and layers fetched per pull, shared by every run waiting on it.
//! - [`cache`]: the LRU policy over `--image-cache-bytes` (pure, behind the `ImageStore` trait).
//! - [`accounts`]: an image's `/etc/passwd` and `/etc/group`, read through a read-only view.
//! - [`store`]: the cache's containerd side (`ImageStore` over the image records and content).

pub mod accounts;
pub mod cache;
pub mod content;
pub mod manifest;
pub mod progress;
pub mod pull;
pub mod registry;
pub mod store;
pub mod unpack;
