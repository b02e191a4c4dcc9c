//! The OCI runtimes a node runs containers with (issue #16): runc for every run, and gVisor's
//! `runsc` for sandboxed runs when the node has it and it works.
//!
//! containerd's runc v2 shim drives any runtime binary that speaks runc's command line, named
//! by the container's runtime options (`BinaryName`): that is how a sandboxed run goes through
//! the same shim, the same task API and the same supervisor as any other. runsc needs flags of
//! its own (the platform; `--oci-seccomp`, so that the run's seccomp profile is enforced inside
//! the sandbox as runc enforces it on the host), and the shim passes none, so the agent writes a
//! small wrapper, `<state dir>/runsc/runsc`, that adds them, and names that wrapper.
//!
//! One kernel quirk needs more: gVisor's netstack refuses to take over a network namespace it
//! believes is the host's, and runsc releases before mid-2024 believe so whenever
//! `/proc/sys/net/core/rmem_default` exists, which recent kernels (6.11 on) show in every
//! namespace (gVisor issue 10704; Debian bookworm's runsc 0.0~20221219 on this project's 6.18
//! test kernel). On such a kernel the wrapper runs runsc in a mount namespace of its own
//! (`unshare --mount --propagation slave`, so the host's mounts and unmounts still reach it)
//! with an empty read-only tmpfs over `/proc/sys/net`. The check it disables is the agent's
//! job instead: a sandboxed run's container always joins a network namespace the agent made,
//! never the host's (`containerd::create` refuses one that would).
//!
//! At start the agent finds `runsc` (`--sandbox-runtime auto`: on `PATH`), asks its version,
//! writes the wrapper and runs one real sandbox through it (`runsc do true`): only a runtime
//! that ran something is advertised to the scheduler. `auto` without a working runsc leaves the
//! node a runc-only node (with a warning when runsc is there but fails); a path given
//! explicitly that does not work stops the agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_core::model::{Isolation, RUNTIME_RUNC, RUNTIME_RUNSC};

/// Where the runtimes' binaries are looked for when `PATH` is not set.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Upper bound for `--version` and the check's sandbox.
const CHECK_LIMIT: Duration = Duration::from_secs(30);

/// What the node runs containers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRuntimes {
    /// `runc` and its version (`runc 1.1.5`), for the runs' records.
    pub runc: String,
    /// gVisor, when the node has it and it works.
    pub gvisor: Option<Gvisor>,
}

/// A working gVisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gvisor {
    /// The wrapper containerd's shim runs (`BinaryName`): runsc with this node's flags.
    pub binary: PathBuf,
    /// `runsc` and its version (`runsc 0.0~20221219.0`).
    pub description: String,
}

impl Default for OciRuntimes {
    /// runc alone, version unknown.
    fn default() -> Self {
        Self {
            runc: RUNTIME_RUNC.to_owned(),
            gvisor: None,
        }
    }
}

impl OciRuntimes {
    /// The runtime names the node advertises when it registers.
    pub fn names(&self) -> Vec<String> {
        let mut names = vec![RUNTIME_RUNC.to_owned()];
        if self.gvisor.is_some() {
            names.push(RUNTIME_RUNSC.to_owned());
        }
        names
    }

    /// The runtime (with its version) a run of `isolation` runs with; None when the node cannot.
    pub fn describe(&self, isolation: Isolation) -> Option<String> {
        match isolation {
            Isolation::Container => Some(self.runc.clone()),
            Isolation::Sandbox => self.gvisor.as_ref().map(|g| g.description.clone()),
        }
    }
}

/// `--sandbox-runtime`: where runsc is, or whether to look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxRuntime {
    /// Use `runsc` from `PATH` if it is there and works.
    Auto,
    /// No sandboxed runs on this node.
    Off,
    /// This runsc binary, which must work.
    Path(PathBuf),
}

impl std::str::FromStr for SandboxRuntime {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(SandboxRuntime::Auto),
            "off" | "none" => Ok(SandboxRuntime::Off),
            path if path.starts_with('/') => Ok(SandboxRuntime::Path(PathBuf::from(path))),
            other => Err(format!(
                "`{other}` is neither auto, off nor an absolute path to runsc"
            )),
        }
    }
}

/// How the node's runs are networked, as far as gVisor cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxNetwork {
    /// Each run joins a network namespace the agent attached: gVisor's own network stack
    /// takes over its interfaces (`--network=sandbox`).
    Namespace,
    /// Runs have no network beyond loopback (`--network=none`: gVisor has no namespace to
    /// take interfaces from).
    None,
}

/// What the wrapper passes to runsc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GvisorOptions {
    /// `--platform`: `ptrace` everywhere, `kvm` where the host offers `/dev/kvm`.
    pub platform: String,
    pub network: SandboxNetwork,
    /// Hide `/proc/sys/net` from runsc (see the module doc); [`detect`] decides.
    pub mask_proc_sys_net: bool,
}

/// Why the runtimes cannot be used as configured.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeSetupError {
    #[error("--sandbox-runtime {path}: {reason}")]
    Gvisor { path: PathBuf, reason: String },
    #[error("writing the runsc wrapper {path}: {source}")]
    Wrapper {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Finds and checks the node's runtimes. runc's version is read for the runs' records (an
/// answer that cannot be read leaves it `runc`); gVisor as [`SandboxRuntime`] says.
pub async fn detect(
    setting: &SandboxRuntime,
    options: &GvisorOptions,
    state_dir: &Path,
) -> Result<OciRuntimes, RuntimeSetupError> {
    let runc = match find_on_path(RUNTIME_RUNC) {
        Some(path) => version(&path, RUNTIME_RUNC)
            .await
            .unwrap_or_else(|_| RUNTIME_RUNC.to_owned()),
        None => RUNTIME_RUNC.to_owned(),
    };
    let runsc = match setting {
        SandboxRuntime::Off => None,
        SandboxRuntime::Auto => find_on_path(RUNTIME_RUNSC),
        SandboxRuntime::Path(path) => Some(path.clone()),
    };
    let gvisor = match runsc {
        None => None,
        Some(path) => match set_up_gvisor(&path, options, state_dir).await {
            Ok(gvisor) => Some(gvisor),
            Err(error @ RuntimeSetupError::Wrapper { .. }) => return Err(error),
            Err(error) if *setting == SandboxRuntime::Auto => {
                tracing::warn!(%error, "runsc is there but does not work: this node takes no sandboxed runs");
                None
            }
            Err(error) => return Err(error),
        },
    };
    match &gvisor {
        Some(g) => {
            tracing::info!(runtime = %g.description, wrapper = %g.binary.display(), platform = %options.platform, "gVisor works: this node takes sandboxed runs")
        }
        None => tracing::info!("no gVisor: this node takes container runs only"),
    }
    Ok(OciRuntimes { runc, gvisor })
}

/// Writes the wrapper for `runsc` and runs one sandbox through it.
async fn set_up_gvisor(
    runsc: &Path,
    options: &GvisorOptions,
    state_dir: &Path,
) -> Result<Gvisor, RuntimeSetupError> {
    let failed = |reason: String| RuntimeSetupError::Gvisor {
        path: runsc.to_path_buf(),
        reason,
    };
    let description = version(runsc, RUNTIME_RUNSC).await.map_err(failed)?;
    let dir = state_dir.join("runsc");
    let binary = dir.join("runsc");
    let mut options = options.clone();
    if options.network == SandboxNetwork::Namespace && namespaced_proc_sys_net().await {
        tracing::warn!(
            runtime = %description,
            "this kernel shows /proc/sys/net/core/rmem_default in every network namespace, which runsc releases before mid-2024 take for the host's namespace: runsc runs with /proc/sys/net hidden"
        );
        options.mask_proc_sys_net = true;
    }
    let script = wrapper_script(runsc, &options).map_err(failed)?;
    write_wrapper(&dir, &binary, &script).map_err(|source| RuntimeSetupError::Wrapper {
        path: binary.clone(),
        source,
    })?;
    check(&binary, &dir.join("check")).await.map_err(failed)?;
    Ok(Gvisor {
        binary,
        description,
    })
}

/// The wrapper: runsc with this node's flags, then whatever the shim passes.
pub fn wrapper_script(runsc: &Path, options: &GvisorOptions) -> Result<String, String> {
    let path = runsc
        .to_str()
        .filter(|p| p.starts_with('/') && !p.contains(['\'', '\n']))
        .ok_or_else(|| "the path must be absolute, in UTF-8, without quotes".to_owned())?;
    let platform = &options.platform;
    if platform.is_empty()
        || !platform
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!("`{platform}` is not a platform name"));
    }
    let network = match options.network {
        SandboxNetwork::Namespace => "sandbox",
        SandboxNetwork::None => "none",
    };
    let flags = format!("--platform={platform} --network={network} --oci-seccomp");
    let exec = if options.mask_proc_sys_net {
        format!(
            "exec unshare --mount --propagation slave sh -c \\\n  \
             'mount -t tmpfs -o ro,size=4k berth-gvisor /proc/sys/net && exec \"$0\" \"$@\"' \\\n  \
             '{path}' {flags} \"$@\"\n"
        )
    } else {
        format!("exec '{path}' {flags} \"$@\"\n")
    };
    Ok(format!(
        "#!/bin/sh\n\
         # Written by berth-node-agent at every start: containerd's runc shim runs this for\n\
         # sandboxed runs (the container's BinaryName), with runc's arguments.\n\
         {exec}"
    ))
}

/// Whether a network namespace other than the host's shows `/proc/sys/net/core/rmem_default`
/// (recent kernels; see the module doc). Asked of a throwaway namespace (`unshare --net`); no
/// answer counts as no.
async fn namespaced_proc_sys_net() -> bool {
    let mut command = tokio::process::Command::new("unshare");
    command.args(["--net", "test", "-e", "/proc/sys/net/core/rmem_default"]);
    command
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    matches!(
        tokio::time::timeout(CHECK_LIMIT, command.status()).await,
        Ok(Ok(status)) if status.success()
    )
}

/// Writes the wrapper, root's alone (the shim that runs it runs as root, like the agent).
fn write_wrapper(dir: &Path, binary: &Path, script: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let tmp = dir.join("runsc.new");
    std::fs::write(&tmp, script)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700))?;
    std::fs::rename(&tmp, binary)
}

/// `<binary> --version`'s first line, as `<name> <version>`.
async fn version(binary: &Path, name: &str) -> Result<String, String> {
    let out = output(tokio::process::Command::new(binary).arg("--version")).await?;
    parse_version(name, &out).ok_or_else(|| format!("unexpected --version answer: {out:?}"))
}

/// `runsc version 0.0~20221219.0` (or `runc version 1.1.5`) → `runsc 0.0~20221219.0`.
pub fn parse_version(name: &str, answer: &str) -> Option<String> {
    let first = answer.lines().next()?.trim();
    let version = first
        .strip_prefix(name)?
        .trim_start()
        .strip_prefix("version")?
        .trim();
    (!version.is_empty() && !version.contains(char::is_whitespace))
        .then(|| format!("{name} {version}"))
}

/// Runs `true` in a sandbox through the wrapper (its own state under `root`, no network).
async fn check(binary: &Path, root: &Path) -> Result<(), String> {
    std::fs::create_dir_all(root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    let mut command = tokio::process::Command::new(binary);
    command
        .arg("--root")
        .arg(root)
        .arg("--network=none")
        .args(["do", "true"])
        .current_dir(root);
    let result = output(&mut command).await;
    let _ = std::fs::remove_dir_all(root);
    result
        .map(drop)
        .map_err(|e| format!("a sandbox did not run: {e}"))
}

/// Runs `command` to its end within [`CHECK_LIMIT`]; its stdout, or why not.
async fn output(command: &mut tokio::process::Command) -> Result<String, String> {
    command
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(CHECK_LIMIT, command.output())
        .await
        .map_err(|_| format!("no answer within {}s", CHECK_LIMIT.as_secs()))?
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        return Err(format!(
            "{}: {}",
            out.status,
            last.unwrap_or("(no message)").trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The first executable `name` on `PATH`.
fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned());
    path.split(':')
        .filter(|dir| dir.starts_with('/'))
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn options() -> GvisorOptions {
        GvisorOptions {
            platform: "ptrace".into(),
            network: SandboxNetwork::None,
            mask_proc_sys_net: false,
        }
    }

    /// A stand-in runsc: answers `--version`, records its arguments, and fails `do` when told.
    fn fake_runsc(dir: &Path, works: bool) -> PathBuf {
        let path = dir.join("runsc");
        let log = dir.join("args");
        let script = format!(
            "#!/bin/sh\n\
             echo \"$@\" >> '{}'\n\
             case \"$*\" in *--version*) echo 'runsc version 0.0~20221219.0'; echo 'spec: 1.0.2-dev'; exit 0;; esac\n\
             {}\n",
            log.display(),
            if works { "exit 0" } else { "echo 'cannot create sandbox: boom' >&2; exit 128" }
        );
        std::fs::write(&path, script).expect("write fake runsc");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[test]
    fn versions_are_read_from_the_first_line() {
        assert_eq!(
            parse_version("runsc", "runsc version 0.0~20221219.0\nspec: 1.0.2-dev\n"),
            Some("runsc 0.0~20221219.0".into())
        );
        assert_eq!(
            parse_version("runc", "runc version 1.1.5\ncommit: v1.1.5\n"),
            Some("runc 1.1.5".into())
        );
        assert_eq!(parse_version("runsc", "something else\n"), None);
        assert_eq!(parse_version("runsc", "runsc version\n"), None);
        assert_eq!(parse_version("runsc", ""), None);
    }

    #[test]
    fn settings_parse_and_bad_ones_are_named() {
        assert_eq!("auto".parse(), Ok(SandboxRuntime::Auto));
        assert_eq!("off".parse(), Ok(SandboxRuntime::Off));
        assert_eq!(
            "/usr/bin/runsc".parse(),
            Ok(SandboxRuntime::Path("/usr/bin/runsc".into()))
        );
        let err = "runsc".parse::<SandboxRuntime>().expect_err("relative");
        assert!(err.contains("absolute path"), "{err}");
    }

    #[test]
    fn the_wrapper_adds_the_nodes_flags_and_refuses_what_it_cannot_quote() {
        let namespace = GvisorOptions {
            network: SandboxNetwork::Namespace,
            ..options()
        };
        let script = wrapper_script(Path::new("/usr/bin/runsc"), &namespace).expect("script");
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.contains(
            "exec '/usr/bin/runsc' --platform=ptrace --network=sandbox --oci-seccomp \"$@\""
        ));
        assert!(wrapper_script(Path::new("/usr/bin/runsc"), &options())
            .expect("script")
            .contains("--network=none"));
        assert!(wrapper_script(Path::new("/opt/it's/runsc"), &options()).is_err());
        assert!(wrapper_script(Path::new("runsc"), &options()).is_err());
        let odd = GvisorOptions {
            platform: "kvm --debug".into(),
            ..options()
        };
        assert!(wrapper_script(Path::new("/usr/bin/runsc"), &odd).is_err());
    }

    #[tokio::test]
    async fn a_working_runsc_is_advertised_through_its_wrapper() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runsc = fake_runsc(dir.path(), true);
        let state = dir.path().join("state");
        let found = detect(&SandboxRuntime::Path(runsc.clone()), &options(), &state)
            .await
            .expect("detected");
        let gvisor = found.gvisor.clone().expect("gvisor");
        assert_eq!(gvisor.description, "runsc 0.0~20221219.0");
        assert_eq!(gvisor.binary, state.join("runsc/runsc"));
        assert_eq!(found.names(), ["runc", "runsc"]);
        assert_eq!(
            found.describe(Isolation::Sandbox).as_deref(),
            Some("runsc 0.0~20221219.0")
        );
        // The check ran a sandbox through the wrapper, with the node's flags first.
        let args = std::fs::read_to_string(dir.path().join("args")).expect("args");
        let check = args
            .lines()
            .find(|l| l.contains(" do true"))
            .expect("check ran");
        assert!(
            check.starts_with("--platform=ptrace --network=none --oci-seccomp --root "),
            "{check}"
        );
        assert!(check.ends_with("--network=none do true"), "{check}");
        // The check's own state is gone; the wrapper stays.
        assert!(!state.join("runsc/check").exists());
        assert!(gvisor.binary.is_file());
    }

    /// The masking wrapper for old runsc on new kernels, run for real (needs root, as the agent
    /// does): runsc sees no `/proc/sys/net` and gets every argument; the host keeps its own.
    #[tokio::test]
    async fn the_masking_wrapper_hides_proc_sys_net_from_runsc_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runsc = dir.path().join("runsc");
        std::fs::write(
            &runsc,
            "#!/bin/sh\n\
             if test -e /proc/sys/net/core/rmem_default; then echo visible; else echo hidden; fi\n\
             echo \"$@\"\n",
        )
        .expect("write");
        std::fs::set_permissions(&runsc, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let masked = GvisorOptions {
            network: SandboxNetwork::Namespace,
            mask_proc_sys_net: true,
            ..options()
        };
        let wrapper = dir.path().join("wrapper");
        write_wrapper(
            dir.path(),
            &wrapper,
            &wrapper_script(&runsc, &masked).expect("script"),
        )
        .expect("wrapper");
        let out = output(
            tokio::process::Command::new(&wrapper).args(["create", "--bundle", "/b c", "id"]),
        )
        .await
        .expect("the wrapper runs");
        assert_eq!(
            out,
            "hidden\n--platform=ptrace --network=sandbox --oci-seccomp create --bundle /b c id\n"
        );
        assert!(
            Path::new("/proc/sys/net/core/rmem_default").exists(),
            "the host's view is untouched"
        );
    }

    #[tokio::test]
    async fn a_broken_runsc_is_left_out_when_looked_for_and_fatal_when_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runsc = fake_runsc(dir.path(), false);
        let state = dir.path().join("state");
        let err = detect(&SandboxRuntime::Path(runsc.clone()), &options(), &state)
            .await
            .expect_err("named and broken");
        let message = err.to_string();
        assert!(message.contains("a sandbox did not run"), "{message}");
        assert!(message.contains("boom"), "{message}");
        let off = detect(&SandboxRuntime::Off, &options(), &state)
            .await
            .expect("off");
        assert_eq!(off.gvisor, None);
        assert_eq!(off.names(), ["runc"]);
        assert_eq!(off.describe(Isolation::Sandbox), None);
    }
}
