//! # Layout
//! The gRPC contract between Berth's processes, generated from `proto/berth/v1/*.proto`:
//! - `AgentService`: node agents dial out to the scheduler and keep one bidirectional stream.
//! - `ControlService`: the public API's way into the state the scheduler owns.
//!
//! `tonic` is re-exported so every crate uses the same version.

pub use tonic;

/// Version 1 of the contract.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("berth.v1");
}
