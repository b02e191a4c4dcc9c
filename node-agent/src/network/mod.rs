//! Each run's network and the host's protection from it.
//!
//! - [`cni`]: the run's network namespace, connected to the host bridge through the CNI plugins
//!   (bridge, host-local, loopback), and its DNS configuration.
//! - [`error`]: [`error::NetworkError`], shared by both.
//! - [`firewall`]: the iptables rules that keep runs away from the host, from each other and from
//!   link-local addresses.
//! - [`warm`]: networks attached ahead of the runs that take them (one each, never reused).

pub mod cni;
pub mod error;
pub mod firewall;
pub mod warm;
