//! Builds the OCI runtime spec for one run from the scheduler's `RunSpec` and the image config.
//! The pure resolution steps (arguments, environment, user) are separate functions so they can be
//! tested without containerd.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::run::user::ExecUser;
use berth_core::codes::ErrorCode;
use berth_proto::v1::RunSpec;
use oci_spec::runtime::{
    Capability, LinuxCapabilities, LinuxCpu, LinuxDeviceCgroup, LinuxMemory, LinuxNamespace,
    LinuxNamespaceType, LinuxPids, LinuxResources, Mount, PosixRlimitBuilder, PosixRlimitType,
    Spec, User,
};

use crate::image::manifest::ImageRunConfig;
use crate::network::cni::NetworkAttachment;
use crate::run::seccomp;

/// The annotation that marks a sandboxed run's container (value `sandbox`): the runtime runs it
/// with gVisor. Part of the spec, so a ready sandbox (`run::sandboxes`) serves only runs of
/// the same isolation.
pub const ISOLATION_ANNOTATION: &str = "berth.isolation";

/// PATH used when neither the image nor the run sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Open-files limit inside containers; must stay below this host's hard limit (20000).
pub const NOFILE_LIMIT: u64 = 1024;
/// Default upper bound on processes (and threads) per run, enforced by the pids cgroup: plenty
/// for real workloads, and a fork bomb stops there instead of exhausting the node's pid space.
pub const DEFAULT_PIDS_LIMIT: i64 = 1024;
const CPU_PERIOD_MICROS: u64 = 100_000;

/// Why a spec could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// neither the run nor the image gives a command to execute
    #[error("no command to run: the run sets no entrypoint/cmd and the image defines none")]
    EmptyCommand,
    /// oci-spec rejected a value
    #[error("building the runtime spec failed: {0}")]
    Oci(#[from] oci_spec::OciSpecError),
}

impl SpecError {
    /// The machine-readable `error_code` reported to the scheduler.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            SpecError::EmptyCommand => ErrorCode::InvalidCommand,
            SpecError::Oci(_) => ErrorCode::InvalidSpec,
        }
    }
}

/// Process arguments: entrypoint (run's if set, else image's) followed by the command (run's if
/// set; else the image's, unless the run replaced the entrypoint).
pub fn resolve_args(run: &RunSpec, image: &ImageRunConfig) -> Result<Vec<String>, SpecError> {
    let entrypoint = if run.entrypoint_set {
        run.entrypoint.clone()
    } else {
        image.entrypoint().clone().unwrap_or_default()
    };
    let cmd = if run.cmd_set {
        run.cmd.clone()
    } else if run.entrypoint_set {
        Vec::new()
    } else {
        image.cmd().clone().unwrap_or_default()
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() || args[0].is_empty() {
        return Err(SpecError::EmptyCommand);
    }
    Ok(args)
}

/// Environment: the image's `KEY=VALUE` list with the run's variables overriding or appended (in
/// key order, so the spec is deterministic), plus a default PATH if nothing set one.
pub fn resolve_env(run_env: &HashMap<String, String>, image_env: &[String]) -> Vec<String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for entry in image_env {
        let (key, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
        match out.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_string(),
            None => out.push((key.to_string(), value.to_string())),
        }
    }
    let mut run_keys: Vec<&String> = run_env.keys().collect();
    run_keys.sort();
    for key in run_keys {
        let value = run_env.get(key).cloned().unwrap_or_default();
        match out.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => out.push((key.clone(), value)),
        }
    }
    if !out.iter().any(|(k, _)| k == "PATH") {
        out.insert(0, ("PATH".to_string(), DEFAULT_PATH.to_string()));
    }
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The capability set Docker and containerd give containers by default.
pub fn default_capabilities() -> HashSet<Capability> {
    [
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fsetid,
        Capability::Fowner,
        Capability::Mknod,
        Capability::NetRaw,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setfcap,
        Capability::Setpcap,
        Capability::NetBindService,
        Capability::SysChroot,
        Capability::Kill,
        Capability::AuditWrite,
    ]
    .into_iter()
    .collect()
}

/// Everything `build_spec` needs besides the two inputs it resolves.
pub struct SpecInputs<'a> {
    pub run_id: &'a str,
    pub run: &'a RunSpec,
    pub image: &'a ImageRunConfig,
    /// cgroup parent without leading slash, e.g. `berth/node-1`.
    pub cgroup_parent: &'a str,
    /// `pids.max` of the run's cgroup (values below 1 are raised to 1).
    pub pids_limit: i64,
    /// Who the process runs as (see [`crate::run::user`]).
    pub user: &'a ExecUser,
}

/// The cgroups path runc uses for a run: `/<parent>/<run id>`.
pub fn cgroups_path(cgroup_parent: &str, run_id: &str) -> String {
    format!("/{}/{run_id}", cgroup_parent.trim_matches('/'))
}

/// Builds the complete runtime spec.
pub fn build_spec(inputs: &SpecInputs<'_>) -> Result<Spec, SpecError> {
    let args = resolve_args(inputs.run, inputs.image)?;
    let mut env = resolve_env(
        &inputs.run.env,
        inputs.image.env().as_deref().unwrap_or_default(),
    );
    // HOME from the user's passwd entry unless the image or the run sets it (as Docker does).
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", inputs.user.home));
    }
    let cwd = inputs
        .image
        .working_dir()
        .clone()
        .filter(|w| w.starts_with('/'))
        .unwrap_or_else(|| "/".to_string());

    let mut spec = Spec::default();
    spec.set_hostname(Some(inputs.run_id.chars().take(63).collect()));
    let isolation = berth_core::convert::isolation_from_pb(inputs.run.isolation);
    if !isolation.is_container() {
        spec.set_annotations(Some(
            [(
                ISOLATION_ANNOTATION.to_owned(),
                isolation.as_str().to_owned(),
            )]
            .into(),
        ));
    }

    let mut process = spec.process().clone().unwrap_or_default();
    process.set_terminal(Some(false));
    process.set_args(Some(args));
    process.set_env(Some(env));
    process.set_cwd(PathBuf::from(cwd));
    let mut user = User::default();
    user.set_uid(inputs.user.uid);
    user.set_gid(inputs.user.gid);
    if !inputs.user.additional_gids.is_empty() {
        user.set_additional_gids(Some(inputs.user.additional_gids.clone()));
    }
    process.set_user(user);
    let caps = default_capabilities();
    let mut capabilities = LinuxCapabilities::default();
    capabilities.set_bounding(Some(caps.clone()));
    capabilities.set_effective(Some(caps.clone()));
    capabilities.set_permitted(Some(caps));
    capabilities.set_inheritable(Some(HashSet::new()));
    capabilities.set_ambient(Some(HashSet::new()));
    process.set_capabilities(Some(capabilities));
    process.set_no_new_privileges(Some(true));
    let nofile = PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .soft(NOFILE_LIMIT)
        .hard(NOFILE_LIMIT)
        .build()?;
    process.set_rlimits(Some(vec![nofile]));
    spec.set_process(Some(process));

    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(PathBuf::from("rootfs"));
    root.set_readonly(Some(false));
    spec.set_root(Some(root));

    let mut linux = spec.linux().clone().unwrap_or_default();
    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Network,
    ]
    .into_iter()
    .map(|typ| {
        let mut ns = LinuxNamespace::default();
        ns.set_typ(typ);
        ns
    })
    .collect();
    linux.set_namespaces(Some(namespaces));
    // Spec::default() masks /proc/kcore, /proc/keys, /sys/firmware, ... and makes /proc/sys,
    // /proc/sysrq-trigger, ... read-only; the unit test below keeps that so.
    linux.set_seccomp(Some(seccomp::default_profile()?));
    linux.set_cgroups_path(Some(PathBuf::from(cgroups_path(
        inputs.cgroup_parent,
        inputs.run_id,
    ))));

    let memory_bytes =
        i64::try_from(inputs.run.memory_mib.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX);
    let mut resources = LinuxResources::default();
    if inputs.run.memory_mib > 0 {
        let mut memory = LinuxMemory::default();
        memory.set_limit(Some(memory_bytes));
        // `swap` is memory + swap (cgroup v1 `memory.memsw.limit_in_bytes`): equal to the limit
        // means no swap at all, so a run over its limit is OOM-killed instead of swapping.
        memory.set_swap(Some(memory_bytes));
        resources.set_memory(Some(memory));
    }
    if inputs.run.cpu_millis > 0 {
        let mut cpu = LinuxCpu::default();
        cpu.set_quota(Some(i64::from(inputs.run.cpu_millis) * 100));
        cpu.set_period(Some(CPU_PERIOD_MICROS));
        resources.set_cpu(Some(cpu));
    }
    let mut pids = LinuxPids::default();
    pids.set_limit(inputs.pids_limit.max(1));
    resources.set_pids(Some(pids));
    // Deny all devices first; runc then allows its standard set (null, zero, tty, ...).
    let mut deny_all = LinuxDeviceCgroup::default();
    deny_all.set_allow(false);
    deny_all.set_access(Some("rwm".to_string()));
    resources.set_devices(Some(vec![deny_all]));
    linux.set_resources(Some(resources));
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// Makes the container join the run's network namespace (instead of a new, unconnected one)
/// and, when there is one, see `resolv_conf` read-only at `/etc/resolv.conf`.
pub fn join_network(spec: &mut Spec, attachment: &NetworkAttachment) {
    if let Some(linux) = spec.linux_mut() {
        let mut namespaces = linux.namespaces().clone().unwrap_or_default();
        namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
        let mut network = LinuxNamespace::default();
        network.set_typ(LinuxNamespaceType::Network);
        network.set_path(Some(attachment.netns.clone()));
        namespaces.push(network);
        linux.set_namespaces(Some(namespaces));
    }
    if let Some(resolv_conf) = attachment.resolv_conf.as_deref() {
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        mounts.push(read_only_bind(resolv_conf, Path::new("/etc/resolv.conf")));
        spec.set_mounts(Some(mounts));
    }
}

fn read_only_bind(source: &Path, destination: &Path) -> Mount {
    let mut mount = Mount::default();
    mount.set_destination(destination.to_path_buf());
    mount.set_typ(Some("bind".to_string()));
    mount.set_source(Some(source.to_path_buf()));
    mount.set_options(Some(
        ["rbind", "ro", "nosuid", "nodev", "noexec"]
            .iter()
            .map(|o| o.to_string())
            .collect(),
    ));
    mount
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn image(ep: Option<&[&str]>, cmd: Option<&[&str]>) -> ImageRunConfig {
        let mut config = ImageRunConfig::default();
        config.set_entrypoint(ep.map(s));
        config.set_cmd(cmd.map(s));
        config
    }

    #[test]
    fn image_entrypoint_and_cmd_when_run_sets_nothing() {
        let run = RunSpec::default();
        let args = resolve_args(&run, &image(Some(&["/ep"]), Some(&["a", "b"]))).expect("args");
        assert_eq!(args, s(&["/ep", "a", "b"]));
    }

    #[test]
    fn run_cmd_replaces_image_cmd_keeps_entrypoint() {
        let run = RunSpec {
            cmd_set: true,
            cmd: s(&["sh", "-c", "echo hi"]),
            ..Default::default()
        };
        let args = resolve_args(&run, &image(Some(&["/ep"]), Some(&["x"]))).expect("args");
        assert_eq!(args, s(&["/ep", "sh", "-c", "echo hi"]));
    }

    #[test]
    fn run_entrypoint_drops_image_cmd() {
        let run = RunSpec {
            entrypoint_set: true,
            entrypoint: s(&["/bin/echo"]),
            ..Default::default()
        };
        let args = resolve_args(&run, &image(Some(&["/ep"]), Some(&["x"]))).expect("args");
        assert_eq!(args, s(&["/bin/echo"]));
    }

    #[test]
    fn explicitly_empty_everything_is_invalid() {
        let run = RunSpec {
            entrypoint_set: true,
            cmd_set: true,
            ..Default::default()
        };
        let err = resolve_args(&run, &image(Some(&["/ep"]), Some(&["x"]))).expect_err("empty");
        assert_eq!(err.error_code(), ErrorCode::InvalidCommand);
        assert!(resolve_args(&RunSpec::default(), &image(None, None)).is_err());
    }

    #[test]
    fn env_overlay_overrides_and_adds_path() {
        let mut run_env = HashMap::new();
        run_env.insert("B".to_string(), "run".to_string());
        run_env.insert("C".to_string(), "new".to_string());
        let env = resolve_env(&run_env, &s(&["A=1", "B=image"]));
        assert_eq!(
            env,
            s(&[&format!("PATH={DEFAULT_PATH}"), "A=1", "B=run", "C=new"])
        );
        let env = resolve_env(&HashMap::new(), &s(&["PATH=/x"]));
        assert_eq!(env, s(&["PATH=/x"]));
    }

    #[test]
    fn the_resolved_user_and_its_home_go_into_the_spec() {
        let run = RunSpec {
            cmd_set: true,
            cmd: s(&["true"]),
            ..Default::default()
        };
        let app = ExecUser {
            uid: 1000,
            gid: 1001,
            additional_gids: vec![2000, 2001],
            home: "/home/app".to_owned(),
        };
        let spec = spec_as(&run, &app);
        let json = spec_json(&spec);
        assert_eq!(json["process"]["user"]["uid"], 1000);
        assert_eq!(json["process"]["user"]["gid"], 1001);
        assert_eq!(
            json["process"]["user"]["additionalGids"],
            serde_json::json!([2000, 2001])
        );
        let env = json["process"]["env"].as_array().expect("env");
        assert!(
            env.contains(&serde_json::json!("HOME=/home/app")),
            "{env:?}"
        );
        // A HOME the run sets wins.
        let run = RunSpec {
            env: HashMap::from([("HOME".to_owned(), "/work".to_owned())]),
            ..run
        };
        let spec = spec_as(&run, &app);
        let homes: Vec<_> = spec_json(&spec)["process"]["env"]
            .as_array()
            .expect("env")
            .iter()
            .filter(|e| e.as_str().is_some_and(|e| e.starts_with("HOME=")))
            .cloned()
            .collect();
        assert_eq!(homes, vec![serde_json::json!("HOME=/work")]);
    }

    #[test]
    fn spec_has_limits_and_cgroup_path() {
        let run = RunSpec {
            cmd_set: true,
            cmd: s(&["true"]),
            memory_mib: 64,
            cpu_millis: 500,
            ..Default::default()
        };
        let img = ImageRunConfig::default();
        let spec = build_spec(&SpecInputs {
            run_id: "r1",
            run: &run,
            image: &img,
            cgroup_parent: "berth/n1",
            pids_limit: 321,
            user: &ExecUser::root(),
        })
        .expect("spec");
        let json = serde_json::to_value(&spec).expect("serializes");
        assert_eq!(json["linux"]["cgroupsPath"], "/berth/n1/r1");
        assert_eq!(
            json["linux"]["resources"]["memory"]["limit"],
            64 * 1024 * 1024
        );
        assert_eq!(json["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(
            json["linux"]["resources"]["memory"]["swap"],
            64 * 1024 * 1024,
            "no swap beyond the memory limit"
        );
        assert_eq!(json["linux"]["resources"]["pids"]["limit"], 321);
        assert_eq!(json["process"]["rlimits"][0]["hard"], NOFILE_LIMIT);
        assert_eq!(json["process"]["cwd"], "/");
        let ns: Vec<String> = json["linux"]["namespaces"]
            .as_array()
            .expect("array")
            .iter()
            .map(|n| n["type"].as_str().unwrap_or_default().to_string())
            .collect();
        assert!(ns.contains(&"network".to_string()) && !ns.contains(&"cgroup".to_string()));
    }

    fn spec_json(spec: &Spec) -> serde_json::Value {
        serde_json::to_value(spec).expect("serializes")
    }

    fn plain_spec() -> Spec {
        let run = RunSpec {
            cmd_set: true,
            cmd: s(&["true"]),
            ..Default::default()
        };
        spec_as(&run, &ExecUser::root())
    }

    /// The spec of `run` as `user`, from an image that sets nothing.
    fn spec_as(run: &RunSpec, user: &ExecUser) -> Spec {
        build_spec(&SpecInputs {
            run_id: "r1",
            run,
            image: &ImageRunConfig::default(),
            cgroup_parent: "berth/n1",
            pids_limit: 10,
            user,
        })
        .expect("spec")
    }

    #[test]
    fn spec_confines_the_process() {
        let json = spec_json(&plain_spec());
        assert_eq!(json["process"]["noNewPrivileges"], true);
        let caps = json["process"]["capabilities"]["bounding"]
            .as_array()
            .expect("bounding")
            .len();
        assert_eq!(caps, default_capabilities().len());
        assert!(json["process"]["capabilities"]["ambient"]
            .as_array()
            .is_some_and(|a| a.is_empty()));
        assert_eq!(json["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        assert!(json["linux"]["seccomp"]["syscalls"]
            .as_array()
            .is_some_and(|s| !s.is_empty()));
        let list = |key: &str| -> Vec<String> {
            json["linux"][key]
                .as_array()
                .expect(key)
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        };
        let masked = list("maskedPaths");
        for path in [
            "/proc/kcore",
            "/proc/keys",
            "/proc/timer_list",
            "/sys/firmware",
        ] {
            assert!(masked.contains(&path.to_string()), "{path} masked");
        }
        let readonly = list("readonlyPaths");
        for path in ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"] {
            assert!(readonly.contains(&path.to_string()), "{path} read-only");
        }
        let sys = json["mounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["destination"] == "/sys")
            .expect("/sys mounted");
        assert!(sys["options"]
            .as_array()
            .is_some_and(|o| o.contains(&"ro".into())));
        // Without a network attachment the run gets a new, empty network namespace.
        let netns = json["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .find(|n| n["type"] == "network")
            .expect("network namespace");
        assert!(netns.get("path").is_none());
    }

    #[test]
    fn joining_a_network_sets_the_namespace_path_and_resolv_conf() {
        let mut spec = plain_spec();
        join_network(
            &mut spec,
            &NetworkAttachment {
                netns: PathBuf::from("/run/berth/netns/n1/r1"),
                address: Some("10.213.0.9/16".to_string()),
                resolv_conf: Some(PathBuf::from("/var/lib/berth/agent-n1/resolv.conf")),
            },
        );
        let json = spec_json(&spec);
        let networks: Vec<&serde_json::Value> = json["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .filter(|n| n["type"] == "network")
            .collect();
        assert_eq!(networks.len(), 1);
        assert_eq!(networks[0]["path"], "/run/berth/netns/n1/r1");
        let resolv = json["mounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["destination"] == "/etc/resolv.conf")
            .expect("resolv.conf mounted");
        assert_eq!(resolv["source"], "/var/lib/berth/agent-n1/resolv.conf");
        assert!(resolv["options"]
            .as_array()
            .is_some_and(|o| o.contains(&"ro".into())));
    }
}
