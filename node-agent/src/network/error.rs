//! The one error type of the run network: CNI, namespaces and the host firewall.

use std::path::PathBuf;

/// Why a run could not be given, or freed of, its network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// the subnet flag is not an IPv4 network in CIDR notation
    #[error("invalid subnet {0:?}: want an IPv4 network like 10.213.0.0/16 (prefix 8 to 28)")]
    InvalidSubnet(String),
    /// the bridge flag is not a usable interface name
    #[error("invalid bridge name {0:?}: 1 to 15 letters, digits, '-', '_' or '.'")]
    InvalidBridge(String),
    /// a run id that cannot name a file and a CNI container
    #[error("run id {0:?} cannot name a network namespace")]
    InvalidRunId(String),
    /// creating or removing the namespace or its files failed
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// a plugin could not be executed
    #[error("running CNI plugin {plugin}: {source}")]
    Exec {
        plugin: String,
        source: std::io::Error,
    },
    /// a plugin reported a failure
    #[error("CNI plugin {plugin} {command} failed: {message}")]
    Plugin {
        plugin: String,
        command: &'static str,
        message: String,
    },
    /// a host firewall command failed
    #[error("{command}: {message}")]
    Firewall { command: String, message: String },
}
