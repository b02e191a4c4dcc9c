//! Each run's network: its own network namespace, plugged into a host bridge by the standard CNI
//! plugins (`bridge` with `host-local` addresses and masquerading, `loopback`), so it reaches
//! other hosts but — with [`crate::network::firewall`] — no port of the host itself.
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
fn check_run_id(run_id: &str) -> Result<(), NetworkError> {
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
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct FakePlugins {
        calls: Mutex<Vec<PluginCall>>,
        /// (plugin, command) that fail
        fail: Option<(&'static str, CniCommand)>,
    }

    impl PluginRunner for FakePlugins {
        fn run(&self, call: &PluginCall) -> Result<Vec<u8>, NetworkError> {
            self.calls.lock().expect("lock").push(call.clone());
            if self.fail == Some((call.plugin.as_str(), call.command)) {
                return Err(NetworkError::Plugin {
                    plugin: call.plugin.clone(),
                    command: call.command.as_str(),
                    message: "no".to_string(),
                });
            }
            Ok(match (call.plugin.as_str(), call.command) {
                ("bridge", CniCommand::Add) => {
                    br#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],
                    "ips":[{"address":"10.213.0.7/16","gateway":"10.213.0.1","interface":0}]}"#
                        .to_vec()
                }
                _ => b"{}".to_vec(),
            })
        }
    }

    /// Namespaces are plain files.
    struct FileNamespaces;

    impl NamespaceOps for FileNamespaces {
        fn create(&self, path: &Path) -> std::io::Result<()> {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map(|_| ())
        }
        fn remove(&self, path: &Path) -> std::io::Result<()> {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
    }

    fn settings(dir: &Path) -> BridgeSettings {
        BridgeSettings {
            bridge: "berth0".to_string(),
            subnet: "10.213.0.0/16".parse().expect("subnet"),
            cni_bin_dir: PathBuf::from("/usr/lib/cni"),
            netns_dir: dir.join("netns"),
            ipam_dir: dir.join("ipam"),
            resolv_conf: Some(dir.join("resolv.conf")),
        }
    }

    fn network(dir: &Path, plugins: FakePlugins) -> CniNetwork<FakePlugins, FileNamespaces> {
        CniNetwork::new(settings(dir), plugins, FileNamespaces)
    }

    fn calls(net: &CniNetwork<FakePlugins, FileNamespaces>) -> Vec<(String, CniCommand, String)> {
        net.plugins
            .calls
            .lock()
            .expect("lock")
            .iter()
            .map(|c| (c.plugin.clone(), c.command, c.ifname.clone()))
            .collect()
    }

    #[test]
    fn subnets_and_bridges_are_checked() {
        let s: Subnet = "10.213.0.0/16".parse().expect("valid");
        assert_eq!(s.to_string(), "10.213.0.0/16");
        for bad in [
            "10.213.0.1/16",
            "10.213.0.0",
            "10.213.0.0/31",
            "x/16",
            "::1/64",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
        assert!(validate_bridge("berth0").is_ok());
        for bad in ["", "a-very-long-bridge-name", "br 0", "br/0"] {
            assert!(validate_bridge(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bridge_config_is_a_gateway_with_masquerade_and_host_local() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = settings(dir.path()).bridge_config();
        assert_eq!(config["type"], "bridge");
        assert_eq!(config["name"], "berth-berth0");
        assert_eq!(config["bridge"], "berth0");
        assert_eq!(config["isGateway"], true);
        assert_eq!(config["ipMasq"], true);
        assert_eq!(config["ipam"]["type"], "host-local");
        assert_eq!(config["ipam"]["ranges"][0][0]["subnet"], "10.213.0.0/16");
        assert_eq!(config["ipam"]["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(
            config["ipam"]["dataDir"],
            dir.path().join("ipam").display().to_string()
        );
    }

    #[test]
    fn attach_adds_loopback_and_bridge_and_saves_the_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let net = network(dir.path(), FakePlugins::default());
        let attachment = net.attach("run-1").expect("attach");
        let netns = dir.path().join("netns/run-1");
        assert_eq!(attachment.netns, netns);
        assert_eq!(attachment.address.as_deref(), Some("10.213.0.7/16"));
        assert_eq!(attachment.resolv_conf, Some(dir.path().join("resolv.conf")));
        assert!(netns.exists());
        let saved: Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("netns/run-1.json")).expect("saved"),
        )
        .expect("json");
        assert_eq!(saved, net.settings().bridge_config());
        assert_eq!(
            calls(&net),
            vec![
                ("loopback".to_string(), CniCommand::Add, "lo".to_string()),
                ("bridge".to_string(), CniCommand::Add, "eth0".to_string()),
            ]
        );
        let recorded = net.plugins.calls.lock().expect("lock");
        assert!(recorded
            .iter()
            .all(|c| c.container_id == "run-1" && c.netns == netns));
        drop(recorded);
        assert_eq!(net.attached_runs(), vec!["run-1".to_string()]);
    }

    #[test]
    fn detach_deletes_with_the_saved_config_and_removes_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let net = network(dir.path(), FakePlugins::default());
        net.attach("run-1").expect("attach");
        // The agent restarts with another subnet: DEL must still get the one ADD got.
        let mut other = settings(dir.path());
        other.subnet = "10.99.0.0/16".parse().expect("subnet");
        let restarted = CniNetwork::new(other, FakePlugins::default(), FileNamespaces);
        restarted.detach("run-1").expect("detach");
        let recorded = restarted.plugins.calls.lock().expect("lock").clone();
        let del = recorded
            .iter()
            .find(|c| c.plugin == "bridge" && c.command == CniCommand::Del)
            .expect("bridge DEL");
        assert_eq!(
            del.config["ipam"]["ranges"][0][0]["subnet"],
            "10.213.0.0/16"
        );
        assert_eq!(del.ifname, "eth0");
        assert!(!dir.path().join("netns/run-1").exists());
        assert!(!dir.path().join("netns/run-1.json").exists());
        assert!(restarted.attached_runs().is_empty());
        // Again: nothing to do, no plugin runs.
        restarted.detach("run-1").expect("idempotent");
        assert_eq!(restarted.plugins.calls.lock().expect("lock").len(), 2);
    }

    #[test]
    fn a_failed_attach_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let net = network(
            dir.path(),
            FakePlugins {
                fail: Some(("bridge", CniCommand::Add)),
                ..Default::default()
            },
        );
        let err = net.attach("run-1").expect_err("bridge ADD fails");
        assert!(err.to_string().contains("bridge ADD failed"), "{err}");
        assert!(calls(&net).contains(&("bridge".to_string(), CniCommand::Del, "eth0".to_string())));
        assert!(net.attached_runs().is_empty());
    }

    #[test]
    fn a_failed_del_keeps_the_config_for_the_next_sweep() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = network(dir.path(), FakePlugins::default());
        ok.attach("run-1").expect("attach");
        let failing = network(
            dir.path(),
            FakePlugins {
                fail: Some(("bridge", CniCommand::Del)),
                ..Default::default()
            },
        );
        assert!(failing.detach("run-1").is_err());
        assert!(
            !dir.path().join("netns/run-1").exists(),
            "namespace released"
        );
        assert_eq!(failing.attached_runs(), vec!["run-1".to_string()]);
        ok.detach("run-1").expect("a later sweep releases it");
        assert!(ok.attached_runs().is_empty());
    }

    #[test]
    fn run_ids_that_cannot_name_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let net = network(dir.path(), FakePlugins::default());
        for bad in ["", "../x", "a/b", ".hidden"] {
            assert!(net.attach(bad).is_err(), "{bad:?}");
        }
        assert!(calls(&net).is_empty());
    }

    #[test]
    fn resolv_conf_drops_loopback_nameservers() {
        let host = "# generated\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\nsearch example.internal\noptions edns0\n";
        assert_eq!(
            container_resolv_conf(host).as_deref(),
            Some("nameserver 10.0.0.2\nsearch example.internal\noptions edns0\n")
        );
        assert_eq!(container_resolv_conf("nameserver 127.0.0.53\n"), None);
    }

    /// A plugin binary: a shell script in `dir`.
    fn script_plugin(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write plugin");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// Runs a plugin, retrying while another test thread's fork still holds the freshly
    /// written script open for writing (ETXTBSY).
    fn run_plugin(runner: &ExecPlugins, call: &PluginCall) -> Result<Vec<u8>, NetworkError> {
        for _ in 0..50 {
            match runner.run(call) {
                Err(NetworkError::Exec { source, .. }) if source.raw_os_error() == Some(26) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
        runner.run(call)
    }

    fn call(plugin: &str, command: CniCommand) -> PluginCall {
        PluginCall {
            plugin: plugin.to_string(),
            command,
            container_id: "run-1".to_string(),
            netns: PathBuf::from("/run/berth/netns/n1/run-1"),
            ifname: "eth0".to_string(),
            config: json!({"cniVersion": CNI_VERSION, "name": "x", "type": plugin}),
        }
    }

    #[test]
    fn plugins_get_the_cni_environment_and_the_config_on_stdin() {
        let dir = tempfile::tempdir().expect("tempdir");
        script_plugin(
            dir.path(),
            "echoer",
            "printf '{\"env\":\"%s %s %s %s %s\",\"stdin\":%s}' \"$CNI_COMMAND\" \"$CNI_CONTAINERID\" \"$CNI_NETNS\" \"$CNI_IFNAME\" \"$CNI_PATH\" \"$(cat)\"",
        );
        let runner = ExecPlugins {
            bin_dir: dir.path().to_path_buf(),
        };
        let out = run_plugin(&runner, &call("echoer", CniCommand::Add)).expect("runs");
        let value: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(
            value["env"],
            format!(
                "ADD run-1 /run/berth/netns/n1/run-1 eth0 {}",
                dir.path().display()
            )
        );
        assert_eq!(value["stdin"]["type"], "echoer");
    }

    #[test]
    fn a_plugin_error_carries_its_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        script_plugin(
            dir.path(),
            "failer",
            "cat >/dev/null; echo '{\"code\":11,\"msg\":\"failed to allocate\",\"details\":\"range full\"}'; exit 1",
        );
        let runner = ExecPlugins {
            bin_dir: dir.path().to_path_buf(),
        };
        let err = run_plugin(&runner, &call("failer", CniCommand::Del)).expect_err("fails");
        let text = err.to_string();
        assert!(
            text.contains("failer DEL failed") && text.contains("failed to allocate: range full"),
            "{text}"
        );
        let missing = runner
            .run(&call("absent", CniCommand::Add))
            .expect_err("no binary");
        assert!(matches!(missing, NetworkError::Exec { .. }), "{missing}");
        let sneaky = runner
            .run(&call("../bin/sh", CniCommand::Add))
            .expect_err("path");
        assert!(matches!(sneaky, NetworkError::Exec { .. }), "{sneaky}");
    }
}
