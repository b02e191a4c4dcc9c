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
    let saved: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("netns/run-1.json")).expect("saved"))
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
