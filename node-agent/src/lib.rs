#![doc = include_str!("../README.md")]

pub mod cli;
pub mod clock;
pub mod config;
pub mod containerd;
pub mod image;
pub mod metrics;
pub mod network;
pub mod oci_runtimes;
pub mod outbox;
pub mod run;
pub mod runtime;
pub mod scheduler_link;
pub mod shim_groups;
