//! Each run's network: its own network namespace, plugged into a host bridge by the standard CNI
//! plugins (`bridge` with `host-local` addresses and masquerading, `loopback`), so it reaches
//! other hosts but — with [`super::firewall`] — no port of the host itself.
//!
//! The namespace is a file `<netns dir>/<run id>` (a bind mount of the namespace, so it outlives
//! every process in it and containerd can join it by path); next to it, `<run id>.json` holds the
//! CNI configuration the run was attached with, written *before* anything is created. Both are
//! what a restarted agent finds to detach a run it re-adopted or that it no longer knows: `DEL`
//! gets the same configuration `ADD` got, whatever the agent's flags are now.
//!
//! [`CniNetwork`] speaks the CNI protocol (a plugin binary per call: configuration on stdin,
//! `CNI_*` in the environment, result or error as JSON on stdout) through [`PluginRunner`] and
//! makes namespaces through [`NamespaceOps`]; the real ones are [`ExecPlugins`] and
//! [`BindMountNamespaces`], the unit tests use fakes.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::network::error::NetworkError;

/// The CNI specification version of the configurations we write (the Debian plugins speak it).
pub const CNI_VERSION: &str = "1.0.0";
/// The interface name of the run's connection to the bridge.
pub const RUN_INTERFACE: &str = "eth0";
/// Default bridge: one per host, shared by every agent on it.
pub const DEFAULT_BRIDGE: &str = "berth0";
/// Default subnet of the bridge (containerd's own default is 10.88.0.0/16; stay clear of it).
pub const DEFAULT_SUBNET: &str = "10.213.0.0/16";
/// Where the Debian package puts the plugins.
pub const DEFAULT_CNI_BIN_DIR: &str = "/usr/lib/cni";
/// `host-local`'s store, shared by every agent of the host (the plugin locks it). On tmpfs:
/// after a reboot no namespace and no address survives, and neither should their records.
pub const DEFAULT_IPAM_DIR: &str = "/run/berth/cni-ipam";
/// Parent of the per-node namespace directories (`<this>/<node id>`).
pub const DEFAULT_NETNS_ROOT: &str = "/run/berth/netns";
/// Fallback `PATH` for the plugins (they run `iptables`) when the agent has none.
const PLUGIN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An IPv4 network, `address/prefix`, as the `--subnet` flag gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Subnet {
    type Err = NetworkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetworkError::InvalidSubnet(s.to_string());
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=28).contains(&prefix) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - u32::from(prefix));
        if u32::from(addr) & !mask != 0 {
            return Err(bad());
        }
        Ok(Subnet {
            network: addr,
            prefix,
        })
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Checks a `--bridge` value: a Linux interface name.
pub fn validate_bridge(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(NetworkError::InvalidBridge(name.to_string()))
    }
}

/// How runs are connected (the agent's network flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSettings {
    pub bridge: String,
    pub subnet: Subnet,
    pub cni_bin_dir: PathBuf,
    /// This agent's namespace files (and their saved configurations).
    pub netns_dir: PathBuf,
    /// `host-local`'s store (shared by the agents of a host).
    pub ipam_dir: PathBuf,
    /// Bind-mounted read-only at the run's `/etc/resolv.conf`, when set.
    pub resolv_conf: Option<PathBuf>,
}

impl BridgeSettings {
    /// The CNI network name: one per bridge, so agents on the same bridge share the address
    /// store (`<ipam dir>/<name>/`) and never hand out an address twice.
    pub fn network_name(&self) -> String {
        format!("berth-{}", self.bridge)
    }

    /// The `bridge` plugin's configuration: the bridge is the runs' gateway, their traffic to
    /// other hosts is masqueraded, addresses come from `host-local`.
    pub fn bridge_config(&self) -> Value {
        json!({
            "cniVersion": CNI_VERSION,
            "name": self.network_name(),
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": true,
            "hairpinMode": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": self.subnet.to_string() }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": self.ipam_dir.display().to_string(),
            },
        })
    }
}

/// The `loopback` plugin's configuration (brings `lo` up in the run's namespace).
pub fn loopback_config() -> Value {
    json!({ "cniVersion": CNI_VERSION, "name": "berth-lo", "type": "loopback" })
}

/// What a container needs to join its run's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkAttachment {
    /// The network namespace file to join.
    pub netns: PathBuf,
    /// The run's address on the bridge (`10.213.0.5/16`), when the plugin reported one.
    pub address: Option<String>,
    /// A resolv.conf to bind-mount at `/etc/resolv.conf`.
    pub resolv_conf: Option<PathBuf>,
}

/// What the container runtime needs from run networking. Blocking: call from a blocking task.
pub trait RunNetwork: Send + Sync + 'static {
    /// Creates the run's namespace and connects it. On failure nothing is left behind.
    fn attach(&self, run_id: &str) -> Result<NetworkAttachment, NetworkError>;
    /// Disconnects the run and removes its namespace: releases its address, its veth and its
    /// masquerading rules. Idempotent; a run never attached is a no-op.
    fn detach(&self, run_id: &str) -> Result<(), NetworkError>;
    /// Runs that hold a namespace or a saved configuration.
    fn attached_runs(&self) -> Vec<String>;
    /// Begins preparing networks ahead of the runs that will take them (after the start-up
    /// sweep of leftovers); a network without a pool does nothing.
    fn prepare_ahead(&self) {}
    /// Releases what was prepared ahead and prepares nothing more (the agent shuts down).
    fn release_ahead(&self) {}
}

/// `ADD` or `DEL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
}

impl CniCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            CniCommand::Add => "ADD",
            CniCommand::Del => "DEL",
        }
    }
}

/// One plugin invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginCall {
    /// The plugin's name (`type` in its configuration).
    pub plugin: String,
    pub command: CniCommand,
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub config: Value,
}

/// Executes CNI plugins.
pub trait PluginRunner: Send + Sync + 'static {
    /// Runs the plugin; returns its stdout (the result of an `ADD`).
    fn run(&self, call: &PluginCall) -> Result<Vec<u8>, NetworkError>;
}

/// Creates and removes persistent network namespaces.
pub trait NamespaceOps: Send + Sync + 'static {
    /// A new, empty network namespace kept alive by the file at `path`.
    fn create(&self, path: &Path) -> std::io::Result<()>;
    /// Releases the namespace at `path` and removes the file; missing is fine.
    fn remove(&self, path: &Path) -> std::io::Result<()>;
}

/// A run id usable as a file name and a CNI container id.
pub(crate) fn check_run_id(run_id: &str) -> Result<(), NetworkError> {
    let ok = !run_id.is_empty()
        && run_id.len() <= 128
        && run_id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && run_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(NetworkError::InvalidRunId(run_id.to_string()))
    }
}

/// The first IPv4 address in an `ADD` result (CNI 1.0: `ips[].address`).
pub fn result_address(result: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(result).ok()?;
    value["ips"]
        .as_array()?
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .find(|a| a.contains('.'))
        .map(str::to_string)
}

/// Run networking through CNI plugins.
pub struct CniNetwork<P: PluginRunner, N: NamespaceOps> {
    settings: BridgeSettings,
    plugins: P,
    namespaces: N,
}

impl<P: PluginRunner, N: NamespaceOps> CniNetwork<P, N> {
    pub fn new(settings: BridgeSettings, plugins: P, namespaces: N) -> Self {
        Self {
            settings,
            plugins,
            namespaces,
        }
    }

    pub fn settings(&self) -> &BridgeSettings {
        &self.settings
    }

    fn netns_path(&self, run_id: &str) -> PathBuf {
        self.settings.netns_dir.join(run_id)
    }

    fn saved_config_path(&self, run_id: &str) -> PathBuf {
        self.settings.netns_dir.join(format!("{run_id}.json"))
    }

    fn call(&self, run_id: &str, command: CniCommand, ifname: &str, config: &Value) -> PluginCall {
        PluginCall {
            plugin: config["type"].as_str().unwrap_or_default().to_string(),
            command,
            container_id: run_id.to_string(),
            netns: self.netns_path(run_id),
            ifname: ifname.to_string(),
            config: config.clone(),
        }
    }

    fn io<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> NetworkError + 'a {
        move |source| NetworkError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    fn try_attach(&self, run_id: &str, config: &Value) -> Result<NetworkAttachment, NetworkError> {
        let dir = &self.settings.netns_dir;
        // Saved first: from here on a restarted agent knows what to detach.
        let saved = self.saved_config_path(run_id);
        let bytes = serde_json::to_vec_pretty(config).unwrap_or_default();
        // A detach may remove the directory once it is empty (see there): try twice.
        let mut written = Ok(());
        for _ in 0..2 {
            std::fs::create_dir_all(dir).map_err(Self::io("creating", dir))?;
            written = std::fs::write(&saved, &bytes);
            if written.is_ok() {
                break;
            }
        }
        written.map_err(Self::io("writing", &saved))?;
        let netns = self.netns_path(run_id);
        self.namespaces
            .create(&netns)
            .map_err(Self::io("creating network namespace", &netns))?;
        self.plugins
            .run(&self.call(run_id, CniCommand::Add, "lo", &loopback_config()))?;
        let result =
            self.plugins
                .run(&self.call(run_id, CniCommand::Add, RUN_INTERFACE, config))?;
        Ok(NetworkAttachment {
            netns,
            address: result_address(&result),
            resolv_conf: self.settings.resolv_conf.clone(),
        })
    }
}

impl<P: PluginRunner, N: NamespaceOps> RunNetwork for CniNetwork<P, N> {
    fn attach(&self, run_id: &str) -> Result<NetworkAttachment, NetworkError> {
        check_run_id(run_id)?;
        let config = self.settings.bridge_config();
        match self.try_attach(run_id, &config) {
            Ok(attachment) => {
                tracing::debug!(run_id, address = ?attachment.address, "run network attached");
                Ok(attachment)
            }
            Err(error) => {
                if let Err(undo) = self.detach(run_id) {
                    tracing::warn!(run_id, error = %undo, "undoing a failed network attach failed");
                }
                Err(error)
            }
        }
    }

    fn detach(&self, run_id: &str) -> Result<(), NetworkError> {
        check_run_id(run_id)?;
        let saved = self.saved_config_path(run_id);
        let netns = self.netns_path(run_id);
        if !saved.exists() && !netns.exists() {
            return Ok(());
        }
        // The configuration the run was attached with; today's if it was never written.
        let config = std::fs::read(&saved)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .unwrap_or_else(|| self.settings.bridge_config());
        // DEL while the namespace still exists: the bridge plugin finds the run's address there
        // to remove its masquerading rules. It releases the address either way.
        let released =
            self.plugins
                .run(&self.call(run_id, CniCommand::Del, RUN_INTERFACE, &config));
        if let Err(error) =
            self.plugins
                .run(&self.call(run_id, CniCommand::Del, "lo", &loopback_config()))
        {
            tracing::debug!(run_id, %error, "loopback DEL failed");
        }
        self.namespaces
            .remove(&netns)
            .map_err(Self::io("removing network namespace", &netns))?;
        // Kept when DEL failed, so the next sweep tries to release the address again.
        released?;
        match std::fs::remove_file(&saved) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Self::io("removing", &saved)(e));
            }
            _ => {}
        }
        // The node's directory goes with its last run (fails, harmlessly, while others remain).
        let _ = std::fs::remove_dir(&self.settings.netns_dir);
        Ok(())
    }

    fn attached_runs(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.settings.netns_dir) else {
            return Vec::new();
        };
        let ids: BTreeSet<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .map(|name| match name.strip_suffix(".json") {
                Some(id) => id.to_string(),
                None => name,
            })
            .filter(|id| check_run_id(id).is_ok())
            .collect();
        ids.into_iter().collect()
    }
}

/// Runs the plugin binaries of a directory.
pub struct ExecPlugins {
    pub bin_dir: PathBuf,
}

impl PluginRunner for ExecPlugins {
    fn run(&self, call: &PluginCall) -> Result<Vec<u8>, NetworkError> {
        let exec_err = |source| NetworkError::Exec {
            plugin: call.plugin.clone(),
            source,
        };
        if call.plugin.is_empty() || call.plugin.contains('/') {
            return Err(exec_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "bad plugin type",
            )));
        }
        let path = std::env::var("PATH").unwrap_or_else(|_| PLUGIN_PATH.to_string());
        let mut child = Command::new(self.bin_dir.join(&call.plugin))
            .env_clear()
            .env("PATH", path)
            .env("CNI_COMMAND", call.command.as_str())
            .env("CNI_CONTAINERID", &call.container_id)
            .env("CNI_NETNS", &call.netns)
            .env("CNI_IFNAME", &call.ifname)
            .env("CNI_PATH", &self.bin_dir)
            .env("CNI_ARGS", "")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(exec_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            let config = serde_json::to_vec(&call.config).unwrap_or_default();
            stdin.write_all(&config).map_err(exec_err)?;
        }
        let output = child.wait_with_output().map_err(exec_err)?;
        if output.status.success() {
            return Ok(output.stdout);
        }
        // A failing plugin prints {"code", "msg", "details"} on stdout.
        let error: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        let mut message = match (error["msg"].as_str(), error["details"].as_str()) {
            (Some(msg), Some(details)) if !details.is_empty() => format!("{msg}: {details}"),
            (Some(msg), _) => msg.to_string(),
            _ => String::from_utf8_lossy(&output.stdout).trim().to_string(),
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !stderr.trim().is_empty() {
            message.push_str(&format!(" ({})", stderr.trim()));
        }
        Err(NetworkError::Plugin {
            plugin: call.plugin.clone(),
            command: call.command.as_str(),
            message: format!("{message} [{}]", output.status),
        })
    }
}

/// Network namespaces kept alive by bind mounts, as `ip netns add` does: a thread of our own
/// moves into a new namespace and bind-mounts it onto the file; the thread then ends, the
/// mount keeps the namespace.
pub struct BindMountNamespaces;

impl NamespaceOps for BindMountNamespaces {
    fn create(&self, path: &Path) -> std::io::Result<()> {
        use nix::mount::{mount, MsFlags};
        use nix::sched::{unshare, CloneFlags};
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        let target = path.to_path_buf();
        let made = std::thread::Builder::new()
            .name("berth-netns".to_string())
            .spawn(move || -> nix::Result<()> {
                unshare(CloneFlags::CLONE_NEWNET)?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
            })?
            .join()
            .map_err(|_| std::io::Error::other("namespace thread panicked"))?;
        if let Err(errno) = made {
            let _ = std::fs::remove_file(path);
            return Err(std::io::Error::from(errno));
        }
        Ok(())
    }

    fn remove(&self, path: &Path) -> std::io::Result<()> {
        use nix::errno::Errno;
        use nix::mount::{umount2, MntFlags};
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(errno) => return Err(std::io::Error::from(errno)),
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The resolv.conf runs get: the host's, without loopback nameservers (a run's loopback is its
/// own, and the host's ports are closed to it anyway). None when no nameserver is left.
pub fn container_resolv_conf(host: &str) -> Option<String> {
    let mut out = String::new();
    let mut nameservers = 0;
    for line in host.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                let Some(addr) = words.next() else { continue };
                let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
                    continue;
                };
                if ip.is_loopback() || ip.is_unspecified() {
                    continue;
                }
                nameservers += 1;
                out.push_str(&format!("nameserver {addr}\n"));
            }
            Some("search") | Some("domain") | Some("options") => {
                out.push_str(line);
                out.push('\n');
            }
            _ => {}
        }
    }
    (nameservers > 0).then_some(out)
}

#[cfg(test)]
mod tests;
