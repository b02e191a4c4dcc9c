//! The scheduler under test: built in release mode, run as a child process on loopback with a
//! fresh store, killed (and its directory removed) on drop.

use crate::submit::control_client;
use anyhow::{bail, Context};
use berth_proto::v1 as pb;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// Builds the scheduler in release mode and returns the binary's path.
pub(crate) fn build_scheduler() -> anyhow::Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the bench crate has no parent directory")?
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building berth-scheduler (cargo build --release -p berth-scheduler)");
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "berth-scheduler"])
        .current_dir(&workspace)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p berth-scheduler failed: {status}");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    Ok(target.join("release").join("berth-scheduler"))
}

/// The scheduler child process and its temporary directory (store and log).
pub(crate) struct SchedulerProcess {
    child: Child,
    pub(crate) addr: SocketAddr,
    log_path: PathBuf,
    // Removed on drop, after the child is dead (fields drop after `Drop::drop`).
    _dir: tempfile::TempDir,
}

impl SchedulerProcess {
    pub(crate) fn spawn(
        bin: &Path,
        data_root: &Path,
        log_filter: &str,
        store: Option<&str>,
        extra_args: &[String],
    ) -> anyhow::Result<SchedulerProcess> {
        if !bin.is_file() {
            bail!(
                "no scheduler binary at {}; build it with `cargo build --release -p berth-scheduler`",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("berth-bench-control-plane-")
            .tempdir_in(data_root)
            .with_context(|| {
                format!("creating a temporary directory in {}", data_root.display())
            })?;
        // A free loopback port: bind port 0, note it, release it for the scheduler.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free loopback port")?;
        let log_path = dir.path().join("scheduler.log");
        // The scheduler logs to stdout; both streams go to one file, read back on errors.
        let log = std::fs::File::create(&log_path).context("creating the scheduler log")?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let child = Command::new(bin)
            .arg("--grpc-listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--default-registry", "127.0.0.1:1"])
            .args(store.map(|s| format!("--store={s}")))
            .args(extra_args)
            .env("BERTH_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(SchedulerProcess {
            child,
            addr,
            log_path,
            _dir: dir,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn endpoint(&self) -> anyhow::Result<Endpoint> {
        Ok(Endpoint::from_shared(format!("http://{}", self.addr))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5)))
    }

    /// Fails if the process has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("the scheduler exited: {status}"),
            None => Ok(()),
        }
    }

    /// Waits until `ControlService` answers.
    pub(crate) async fn ready(&mut self) -> anyhow::Result<Channel> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.check_alive()?;
            if let Ok(channel) = self.endpoint()?.connect().await {
                let mut client = control_client(channel.clone());
                if client.list_nodes(pb::ListNodesRequest {}).await.is_ok() {
                    return Ok(channel);
                }
            }
            if Instant::now() > deadline {
                bail!("the scheduler did not answer on {} within 20 s", self.addr);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for SchedulerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
