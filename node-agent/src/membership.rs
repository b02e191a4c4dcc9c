//! `berth-node-agent join` and `berth-node-agent leave`: a machine with the package installed
//! joins the fleet in one command, and leaves it cleanly in another.
//!
//! `join` exchanges a registration token for the node's own credential (kept 0600 in the state
//! directory; the token is not kept), writes `/etc/berth/node-agent.toml` (checked by parsing it
//! as the daemon will), enables and starts `berth-node-agent.service` when systemd runs the
//! machine, and waits until the agent reports ready (registered with a scheduler, containerd
//! answering). `leave` drains the node through the scheduler (no new runs), waits for its runs
//! to end, stops and disables the agent, has the scheduler remove the node (its credential
//! revoked, its record deleted) and deletes the local credential and config.

use std::ffi::OsString;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use berth_core::config_file;
use berth_core::failover::SchedulerAddrs;
use berth_node_agent::cli::Cli;
use berth_node_agent::scheduler_link::{enroll, leave};
use clap::Parser;

/// The systemd unit the package installs.
pub const UNIT: &str = "berth-node-agent.service";
/// The agent's state directory when installed from the package.
pub const PACKAGE_STATE_DIR: &str = "/var/lib/berth/node-agent";
/// Where `join` has the agent serve `/readyz` (and metrics) unless told otherwise.
pub const DEFAULT_READY_LISTEN: &str = "127.0.0.1:9479";
/// The agent's process ID, written at start for `leave` on machines without systemd.
pub const PID_FILE: &str = "agent.pid";

/// Joins this machine to a fleet as a node.
#[derive(Debug, Parser)]
#[command(name = "berth-node-agent join")]
pub struct JoinArgs {
    /// The schedulers' gRPC addresses, comma-separated (`https://10.0.0.1:7070,https://10.0.0.2:7070`).
    #[arg(long, alias = "scheduler")]
    pub url: SchedulerAddrs,
    /// File holding a registration token of the region (`berthctl admin nodes token create
    /// --region fra`; `-`: standard input), or set `BERTH_REGISTRATION_TOKEN` — never on the
    /// command line, which every local user can read. Exchanged once for the node's own
    /// credential and not kept.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The region the node is in (the token's region).
    #[arg(long)]
    pub region: String,
    /// The node's ID (default: the host name).
    #[arg(long)]
    pub node_id: Option<String>,
    /// The fleet's CA certificate (PEM), for `https://` schedulers (`berthctl admin tls init`).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The config file to write.
    #[arg(long, default_value = "/etc/berth/node-agent.toml")]
    pub config: PathBuf,
    /// The agent's state directory (journals, the node credential).
    #[arg(long, default_value = PACKAGE_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Where the agent serves `/readyz` and `/metrics` (join waits on it).
    #[arg(long, default_value = DEFAULT_READY_LISTEN)]
    pub metrics_listen: SocketAddr,
    /// More settings of the agent for its config file, `KEY=VALUE` (repeatable; keys as in
    /// docs/CONFIG.md, e.g. `--set max_runs=16 --set insecure_registries=10.0.0.5:5000`).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = key_value)]
    pub settings: Vec<(String, String)>,
    /// Write the config and the credential only: do not enable or start the service.
    #[arg(long)]
    pub no_start: bool,
    /// Replace an earlier join of this machine (its config and credential).
    #[arg(long)]
    pub force: bool,
    /// Seconds to wait for a scheduler to answer, and then for the agent to be ready.
    #[arg(long, default_value_t = 120)]
    pub wait_seconds: u64,
}

/// Takes this machine out of the fleet: drain, wait for its runs, stop, remove.
#[derive(Debug, Parser)]
#[command(name = "berth-node-agent leave")]
pub struct LeaveArgs {
    /// The agent's config file (as the daemon reads it; `BERTH_NODE_AGENT_CONFIG` works too).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seconds to wait for the node's runs to end; after that `leave` stops, leaving the node
    /// drained (run it again to go on waiting, or stop the runs).
    #[arg(long, default_value_t = 3600)]
    pub wait_seconds: u64,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    let k = k.trim().replace('-', "_");
    if k.is_empty() {
        return Err(format!("`{s}` has no key"));
    }
    Ok((k, v.to_owned()))
}

/// Prints a line for the operator running the command (not a service: stdout is theirs).
#[allow(clippy::print_stdout)]
fn say(line: &str) {
    println!("{line}");
}

/// The keys `join` writes itself; `--set` may not change them.
const JOIN_KEYS: [&str; 7] = [
    "scheduler",
    "region",
    "node_id",
    "tls_ca",
    "state_dir",
    "credential_file",
    "metrics_listen",
];

/// The text of the agent's config file that `join` writes.
pub fn render_config(
    args: &JoinArgs,
    node_id: &str,
    credential_file: &Path,
    tls_ca: Option<&Path>,
) -> anyhow::Result<String> {
    let mut table = toml::Table::new();
    let mut put = |k: &str, v: toml::Value| {
        table.insert(k.to_owned(), v);
    };
    put("scheduler", args.url.to_string().into());
    put("region", args.region.clone().into());
    put("node_id", node_id.to_owned().into());
    if let Some(ca) = tls_ca {
        put("tls_ca", ca.display().to_string().into());
    }
    put("state_dir", args.state_dir.display().to_string().into());
    put(
        "credential_file",
        credential_file.display().to_string().into(),
    );
    put("metrics_listen", args.metrics_listen.to_string().into());
    for (k, v) in &args.settings {
        if JOIN_KEYS.contains(&k.as_str()) {
            bail!("--set {k}=…: join sets `{k}` itself (use its own flag)");
        }
        put(k, typed(v));
    }
    let body = toml::to_string(&table).context("rendering the config")?;
    Ok(format!(
        "# Written by `berth-node-agent join`: the settings of this node's agent.\n\
         # Every key is described in docs/CONFIG.md; flags and BERTH_AGENT_* variables override.\n\
         {body}"
    ))
}

/// A `--set` value as TOML: a switch or a number when it reads as one, else a string (the
/// agent's own parser checks it either way).
fn typed(v: &str) -> toml::Value {
    match v {
        "true" => true.into(),
        "false" => false.into(),
        _ => v
            .parse::<i64>()
            .map(toml::Value::from)
            .unwrap_or_else(|_| v.to_owned().into()),
    }
}

/// Parses `path` exactly as the daemon will (with no flags and no environment).
pub fn load(path: &Path) -> Result<Cli, config_file::ConfigError> {
    config_file::try_parse_from::<Cli, _, _>(
        "node-agent",
        [
            OsString::from("berth-node-agent"),
            OsString::from("--config"),
            path.as_os_str().to_owned(),
        ],
        |_| None,
    )
}

/// Where the daemon keeps its state and credential with these settings.
pub fn state_dir_of(cli: &Cli) -> PathBuf {
    cli.state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/var/lib/berth/agent-{}", cli.node_id)))
}

pub fn credential_file_of(cli: &Cli) -> PathBuf {
    cli.credential_file
        .clone()
        .unwrap_or_else(|| state_dir_of(cli).join("node.credential"))
}

fn host_name() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name; pass --node-id")?;
    let name = name.trim();
    anyhow::ensure!(!name.is_empty(), "the host has no name; pass --node-id");
    Ok(name.to_owned())
}

fn registration_token(args: &JoinArgs) -> anyhow::Result<String> {
    if args.token_file.as_deref() == Some(Path::new("-")) {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the registration token from standard input")?;
        let token = s.trim().to_owned();
        anyhow::ensure!(!token.is_empty(), "the registration token is empty");
        return Ok(token);
    }
    berth_core::process::secret_setting(
        "BERTH_REGISTRATION_TOKEN",
        "--token-file",
        args.token_file.as_deref(),
    )?
    .context("a registration token is needed: --token-file FILE (or -) or BERTH_REGISTRATION_TOKEN")
}

/// Writes `text` to `path` through a temporary file that must pass `check` first.
fn write_checked(
    path: &Path,
    text: &str,
    check: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("toml.new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    if let Err(e) = check(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// How the agent's service is started and stopped on this machine.
pub enum Service {
    /// systemd runs the machine: the package's unit.
    Systemd,
    /// No service manager: the operator (or a test) starts the agent; `leave` stops it by the
    /// process ID it wrote in its state directory.
    Unmanaged { pid_file: PathBuf },
}

impl Service {
    pub fn detect(state_dir: &Path) -> Service {
        if Path::new("/run/systemd/system").is_dir() {
            Service::Systemd
        } else {
            Service::Unmanaged {
                pid_file: state_dir.join(PID_FILE),
            }
        }
    }

    fn systemctl(args: &[&str]) -> anyhow::Result<()> {
        let status = std::process::Command::new("systemctl")
            .args(args)
            .status()
            .context("running systemctl")?;
        anyhow::ensure!(
            status.success(),
            "systemctl {} failed: {status}",
            args.join(" ")
        );
        Ok(())
    }

    /// Enables the agent at boot and (re)starts it with the new config. Answers whether it
    /// started it.
    fn start(&self) -> anyhow::Result<bool> {
        match self {
            Service::Systemd => {
                Self::systemctl(&["enable", UNIT])?;
                Self::systemctl(&["restart", UNIT])?;
                Ok(true)
            }
            Service::Unmanaged { .. } => Ok(false),
        }
    }

    /// Stops the agent and keeps it from starting again; waits up to `within` for it to exit.
    fn stop(&self, within: Duration) -> anyhow::Result<()> {
        match self {
            Service::Systemd => Self::systemctl(&["disable", "--now", UNIT]),
            Service::Unmanaged { pid_file } => stop_by_pid_file(pid_file, within),
        }
    }
}

/// SIGTERM to the agent whose process ID `pid_file` holds (if it still runs that program),
/// then waits for it to exit.
fn stop_by_pid_file(pid_file: &Path, within: Duration) -> anyhow::Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        say("the agent is not running here (no process ID file)");
        return Ok(());
    };
    let pid: i32 = text
        .trim()
        .parse()
        .with_context(|| format!("{} holds no process ID", pid_file.display()))?;
    // Running that program, and not a zombie (exited, its parent has not reaped it yet).
    let alive = |pid: i32| {
        let ours = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim().starts_with("berth-node-age"));
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = state
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|s| s == "Z" || s == "X");
        ours && !zombie
    };
    if !alive(pid) {
        say("the agent is not running here");
        return Ok(());
    }
    kill(Pid::from_raw(pid), Signal::SIGTERM).context("stopping the agent")?;
    let deadline = Instant::now() + within;
    while alive(pid) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the agent (pid {pid}) did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Polls the agent's `/readyz` until it answers 200 or `within` passes; the last answer on
/// failure.
async fn wait_ready(listen: SocketAddr, within: Duration) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let deadline = Instant::now() + within;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        let probe = async {
            let mut s = tokio::net::TcpStream::connect(listen).await?;
            s.write_all(b"GET /readyz HTTP/1.0\r\nHost: agent\r\n\r\n")
                .await?;
            let mut buf = Vec::new();
            s.take(64 * 1024).read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
        };
        match tokio::time::timeout(Duration::from_secs(3), probe).await {
            Ok(Ok(answer))
                if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") =>
            {
                return Ok(())
            }
            Ok(Ok(answer)) => {
                last = answer
                    .split("\r\n\r\n")
                    .nth(1)
                    .unwrap_or(&answer)
                    .trim()
                    .to_owned()
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "no answer in 3 s".to_owned(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("the agent was not ready within {within:?}: {last}")
}

pub async fn join(args: JoinArgs) -> anyhow::Result<()> {
    let node_id = match &args.node_id {
        Some(id) => id.clone(),
        None => host_name()?,
    };
    let credential_file = args.state_dir.join("node.credential");
    if !args.force && args.config.exists() {
        let earlier = load(&args.config)
            .map(|c| format!("as node {} in {}", c.node_id, c.region))
            .unwrap_or_else(|e| format!("(its config does not parse: {e})"));
        bail!(
            "this machine has joined already {earlier} ({}): run `berth-node-agent leave` first, \
             or join --force to replace it",
            args.config.display()
        );
    }
    let token = registration_token(&args)?;
    let tls_ca = match &args.tls_ca {
        Some(p) => {
            Some(std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))?)
        }
        None => None,
    };
    let mut schedulers = args.url.clone();
    if let Some(ca) = &tls_ca {
        schedulers = schedulers.with_ca(berth_core::tls::read_pem(ca)?);
    }
    schedulers.check_transport()?;
    // The config is checked before the token is spent: a wrong --set fails here.
    let text = render_config(&args, &node_id, &credential_file, tls_ca.as_deref())?;
    let probe = std::env::temp_dir().join(format!("berth-join-{}.toml", std::process::id()));
    write_checked(&probe, &text, |p| {
        load(p).map(|_| ()).map_err(anyhow::Error::from)
    })?;
    let _ = std::fs::remove_file(&probe);
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    std::fs::set_permissions(&args.state_dir, std::fs::Permissions::from_mode(0o700))?;
    let wait = Duration::from_secs(args.wait_seconds);
    say(&format!(
        "enrolling node {node_id} in region {} with {}",
        args.region, args.url
    ));
    let credential = tokio::time::timeout(
        wait,
        enroll::enroll(&schedulers, &token, &node_id, &args.region),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no scheduler of {} answered within {wait:?}", args.url))??;
    enroll::write_credential(&credential_file, &credential)?;
    // The same text the probe above checked.
    write_checked(&args.config, &text, |_| Ok(()))?;
    say(&format!(
        "wrote {} and the node credential {}",
        args.config.display(),
        credential_file.display()
    ));
    if args.no_start {
        say("not started (--no-start): start berth-node-agent when ready");
        return Ok(());
    }
    let service = Service::detect(&args.state_dir);
    if !service.start()? {
        say(&format!(
            "systemd does not run this machine: start the agent yourself, e.g. \
             `berth-node-agent --config {}`",
            args.config.display()
        ));
        return Ok(());
    }
    say(&format!(
        "{UNIT} enabled and started; waiting for it to be ready"
    ));
    wait_ready(args.metrics_listen, wait).await?;
    say(&format!(
        "node {node_id} joined region {}: ready (berthctl nodes list shows it)",
        args.region
    ));
    Ok(())
}

pub async fn leave(args: LeaveArgs) -> anyhow::Result<()> {
    let path = args
        .config
        .clone()
        .or_else(|| std::env::var_os(config_file::env_var("node-agent")).map(PathBuf::from))
        .unwrap_or_else(|| config_file::default_path("node-agent"));
    let cli =
        load(&path).with_context(|| format!("reading the agent's config {}", path.display()))?;
    let state_dir = state_dir_of(&cli);
    let credential_file = credential_file_of(&cli);
    let credential = enroll::read_credential(&credential_file)?;
    let mut schedulers = cli.scheduler.clone();
    if let Some(ca) = &cli.tls_ca {
        schedulers = schedulers.with_ca(berth_core::tls::read_pem(ca)?);
    }
    schedulers.check_transport()?;
    let node_id = cli.node_id.clone();
    let call = |remove: bool| {
        let schedulers = schedulers.clone();
        let node_id = node_id.clone();
        let credential = credential.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(60),
                leave::leave(&schedulers, &node_id, credential.as_deref(), remove),
            )
            .await
            .map_err(|_| anyhow::anyhow!("no scheduler answered within 60 s"))?
            .map_err(anyhow::Error::from)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(args.wait_seconds);
    let mut said = None;
    loop {
        let status = call(false).await?;
        if status.active_runs == 0 {
            break;
        }
        if said != Some(status.active_runs) {
            say(&format!(
                "node {node_id} is drained (no new runs); waiting for its {} run(s) to end",
                status.active_runs
            ));
            said = Some(status.active_runs);
        }
        if Instant::now() >= deadline {
            bail!(
                "node {node_id} still holds {} run(s) after {} s; it stays drained — run leave \
                 again to go on waiting, or stop its runs",
                status.active_runs,
                args.wait_seconds
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    say(&format!("node {node_id} holds no runs; stopping the agent"));
    let service = Service::detect(&state_dir);
    service.stop(Duration::from_secs(cli.shutdown_grace_seconds + 15))?;
    let status = call(true).await?;
    anyhow::ensure!(
        status.removed,
        "the scheduler did not remove node {node_id}"
    );
    for file in [
        credential_file.clone(),
        path.clone(),
        state_dir.join(PID_FILE),
    ] {
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("removing {}: {e}", file.display()),
        }
    }
    say(&format!(
        "node {node_id} left the fleet: removed by the scheduler, its credential revoked; \
         deleted {} and {}",
        path.display(),
        credential_file.display()
    ));
    Ok(())
}

/// Writes the agent's process ID where `leave` finds it (machines without systemd).
pub fn write_pid_file(state_dir: &Path) -> std::io::Result<PathBuf> {
    let path = state_dir.join(PID_FILE);
    std::fs::write(&path, format!("{}\n", std::process::id()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> JoinArgs {
        let mut argv = vec![
            "join",
            "--url",
            "http://127.0.0.1:7070",
            "--token-file",
            "/t",
            "--region",
            "fra",
            "--state-dir",
            "/srv/berth/agent",
        ];
        argv.extend_from_slice(extra);
        JoinArgs::parse_from(argv)
    }

    #[test]
    fn the_written_config_is_what_the_daemon_reads() -> anyhow::Result<()> {
        let a = args(&[
            "--set",
            "max_runs=16",
            "--set",
            "network=none",
            "--set",
            "webhook=x",
        ]);
        // An unknown key is caught before anything is written or spent.
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("node-agent.toml");
        let text = render_config(
            &a,
            "n1",
            Path::new("/srv/berth/agent/node.credential"),
            None,
        )?;
        let err = write_checked(&path, &text, |p| load(p).map(|_| ()).map_err(Into::into))
            .expect_err("unknown key");
        assert!(err.to_string().contains("unknown key `webhook`"), "{err}");
        assert!(!path.exists());
        let a = args(&["--set", "max_runs=16", "--set", "network=none"]);
        let text = render_config(
            &a,
            "n1",
            Path::new("/srv/berth/agent/node.credential"),
            Some(Path::new("/etc/berth/ca.pem")),
        )?;
        write_checked(&path, &text, |p| load(p).map(|_| ()).map_err(Into::into))?;
        let cli = load(&path)?;
        assert_eq!(cli.node_id, "n1");
        assert_eq!(cli.region, "fra");
        assert_eq!(cli.max_runs, 16);
        assert_eq!(cli.scheduler.to_string(), "http://127.0.0.1:7070");
        assert_eq!(cli.tls_ca.as_deref(), Some(Path::new("/etc/berth/ca.pem")));
        assert_eq!(state_dir_of(&cli), Path::new("/srv/berth/agent"));
        assert_eq!(
            credential_file_of(&cli),
            Path::new("/srv/berth/agent/node.credential")
        );
        assert_eq!(cli.metrics_listen, Some(DEFAULT_READY_LISTEN.parse()?));
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        Ok(())
    }

    #[test]
    fn join_s_own_keys_cannot_be_set_twice() {
        let a = args(&["--set", "region=ams"]);
        let err = render_config(&a, "n1", Path::new("/c"), None).expect_err("refused");
        assert!(
            err.to_string().contains("join sets `region` itself"),
            "{err}"
        );
        assert!(key_value("novalue").is_err());
        assert_eq!(
            key_value("max-runs=3"),
            Ok(("max_runs".to_owned(), "3".to_owned()))
        );
    }
}
