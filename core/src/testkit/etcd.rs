//! A private etcd 3.4 cluster on loopback, started from Debian's `etcd-server` binary
//! (`/usr/bin/etcd`, or `BERTH_ETCD_BIN`). Each member has its own data directory under one
//! temporary directory, so a killed member restarts with its data (`--initial-cluster-state
//! existing`). Every member is killed when the cluster is dropped.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const DEFAULT_ETCD_BIN: &str = "/usr/bin/etcd";

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

pub struct EtcdCluster {
    bin: String,
    members: Vec<Member>,
    initial_cluster: String,
    extra_args: Vec<String>,
    dir: tempfile::TempDir,
}

/// How [`EtcdCluster::start_with`] starts the members.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// The etcd binary (default: `BERTH_ETCD_BIN`, else `/usr/bin/etcd`).
    pub bin: Option<PathBuf>,
    /// Where the members' data directories go (default: the system's temporary directory); a
    /// real disk for benchmarks.
    pub parent_dir: Option<PathBuf>,
    /// More flags for every member (e.g. `--quota-backend-bytes=…`).
    pub extra_args: Vec<String>,
}

fn other(message: impl Into<String>) -> io::Error {
    io::Error::other(message.into())
}

/// Distinct free loopback ports (all held until every one is chosen; etcd cannot bind port 0).
fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

impl EtcdCluster {
    /// Starts `n` members and waits until each accepts client connections (a port taken
    /// between the probe and etcd's bind makes it try again with new ports, up to 5 times).
    pub fn start(n: usize) -> io::Result<EtcdCluster> {
        EtcdCluster::start_with(n, &EtcdOptions::default())
    }

    /// Like [`EtcdCluster::start`], with [`EtcdOptions`].
    pub fn start_with(n: usize, options: &EtcdOptions) -> io::Result<EtcdCluster> {
        let bin = match &options.bin {
            Some(b) => b.display().to_string(),
            None => std::env::var("BERTH_ETCD_BIN").unwrap_or_else(|_| DEFAULT_ETCD_BIN.to_owned()),
        };
        if !Path::new(&bin).exists() {
            return Err(other(format!(
                "{bin} is missing: install Debian's etcd-server (deploy/test.sh does)"
            )));
        }
        let mut last = None;
        for _ in 0..5 {
            let ports = free_ports(2 * n)?;
            let members: Vec<Member> = (0..n)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client_port: ports[2 * i],
                    peer_port: ports[2 * i + 1],
                    child: None,
                })
                .collect();
            let initial_cluster = members
                .iter()
                .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
                .collect::<Vec<_>>()
                .join(",");
            let dir = match &options.parent_dir {
                Some(parent) => tempfile::Builder::new()
                    .prefix("berth-etcd-")
                    .tempdir_in(parent)?,
                None => tempfile::Builder::new().prefix("berth-etcd-").tempdir()?,
            };
            let mut cluster = EtcdCluster {
                bin: bin.clone(),
                members,
                initial_cluster,
                extra_args: options.extra_args.clone(),
                dir,
            };
            let started = (0..n).try_for_each(|i| cluster.spawn(i, "new"));
            match started.and_then(|()| cluster.wait_serving(Duration::from_secs(20))) {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| other("etcd did not start")))
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    fn spawn(&mut self, i: usize, state: &str) -> io::Result<()> {
        let data_dir = self.data_dir(i);
        let log = std::fs::File::create(self.dir.path().join(format!("m{i}.log")))?;
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(&self.bin)
            .arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg(format!("--initial-cluster-state={state}"))
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Waits until every running member accepts client connections.
    pub fn wait_serving(&mut self, within: Duration) -> io::Result<()> {
        let deadline = Instant::now() + within;
        for m in &mut self.members {
            let Some(child) = m.child.as_mut() else {
                continue;
            };
            loop {
                if let Some(status) = child.try_wait()? {
                    return Err(other(format!("etcd member {} exited: {status}", m.name)));
                }
                if std::net::TcpStream::connect(("127.0.0.1", m.client_port)).is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(other(format!("etcd member {} did not listen", m.name)));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Runs `etcdctl` (Debian's etcd-client) with `args` against the first member; its
    /// standard output.
    pub fn ctl(&self, args: &[&str]) -> io::Result<String> {
        let endpoint = self.endpoints().into_iter().next().unwrap_or_default();
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(args)
            .output()?;
        if !out.status.success() {
            return Err(other(format!(
                "etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Client URLs, `http://127.0.0.1:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The scheduler's `--store` value for this cluster.
    pub fn store_url(&self) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect();
        format!("etcd://{}", hosts.join(","))
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// SIGKILLs member `i` (its data stays for [`EtcdCluster::restart`]).
    pub fn kill(&mut self, i: usize) -> io::Result<()> {
        if let Some(mut child) = self.members[i].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts member `i` again on its ports with its data.
    pub fn restart(&mut self, i: usize) -> io::Result<()> {
        self.kill(i)?;
        self.spawn(i, "existing")
    }

    /// The member's process id, while it runs (for SIGSTOP/SIGCONT).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Sends `signal` (a name `kill` knows: `STOP`, `CONT`, …) to member `i`.
    pub fn signal(&self, i: usize, signal: &str) -> io::Result<()> {
        let pid = self
            .pid(i)
            .ok_or_else(|| other(format!("etcd member {i} is not running")))?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            return Err(other(format!("kill -{signal} {pid} failed: {status}")));
        }
        Ok(())
    }

    /// Which member is the Raft leader now, as the running members report it (they agree
    /// once an election has settled; until then, any one's answer).
    pub fn raft_leader(&self) -> io::Result<usize> {
        let endpoints = self.endpoints();
        for (i, endpoint) in endpoints.iter().enumerate() {
            if self.pid(i).is_none() {
                continue;
            }
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={endpoint}"))
                .args(["endpoint", "status", "-w", "json"])
                .output()?;
            if !out.status.success() {
                continue;
            }
            let parsed: serde_json::Value =
                serde_json::from_slice(&out.stdout).map_err(|e| other(e.to_string()))?;
            let status = &parsed[0]["Status"];
            let (Some(me), Some(leader)) = (
                status["header"]["member_id"].as_u64(),
                status["leader"].as_u64(),
            ) else {
                continue;
            };
            if me == leader {
                return Ok(i);
            }
        }
        Err(other("no running etcd member says it leads"))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            let _ = self.kill(i);
        }
    }
}
