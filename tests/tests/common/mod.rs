//! The end-to-end harness: starts real `berth-scheduler`, `berth-api` and `berth-node-agent`
//! processes on loopback ports (each binds port 0 and the harness reads the port it logs)
//! against the containerd and registry that `deploy/test.sh` starts,
//! and kills them when dropped. Each fleet uses its own node ids, so its own containerd
//! namespaces and cgroup directories: tests run in parallel without seeing each other.

#![allow(dead_code)]

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod caps;

/// An RFC 3339 instant of the API as unix nanoseconds.
pub fn instant(v: &Value) -> Option<i128> {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(v.as_str()?, &Rfc3339)
        .ok()
        .map(time::OffsetDateTime::unix_timestamp_nanos)
}

/// A schedule's fires (`scheduled_for`, ns) were each made once and none is missing: every time
/// from `first`, `period_ns` apart, up to the last. Answers how many.
pub fn each_fire_once(first: i128, fires: &[i128], period_ns: i128) -> Result<usize> {
    let unique: std::collections::BTreeSet<i128> = fires.iter().copied().collect();
    ensure!(
        unique.len() == fires.len(),
        "a fire happened twice: {fires:?}"
    );
    let last = *unique.last().context("no fires")?;
    let want: std::collections::BTreeSet<i128> = (0..)
        .map(|i| first + i * period_ns)
        .take_while(|t| *t <= last)
        .collect();
    ensure!(unique == want, "fires {unique:?}, expected {want:?}");
    Ok(fires.len())
}

pub const TOKEN: &str = "e2e-test-token-0123456789";
/// The scheduler's `--cluster-token`; the harness's API and agents present it.
pub const CLUSTER_TOKEN: &str = "e2e-cluster-token-9876543210";

/// What `deploy/test.sh` exports. Missing variables are an error, never a silent skip.
pub struct Env {
    pub containerd_socket: String,
    pub registry: String,
    pub bin_dir: PathBuf,
}

pub fn env() -> Result<Env> {
    let var = |k: &str| {
        std::env::var(k).map_err(|_| {
            anyhow!("{k} is not set: run the end-to-end tests through deploy/test.sh, which starts containerd and the registry")
        })
    };
    Ok(Env {
        containerd_socket: var("BERTH_CONTAINERD_SOCKET")?,
        registry: var("BERTH_TEST_REGISTRY")?,
        bin_dir: PathBuf::from(var("BERTH_BIN_DIR")?),
    })
}

/// The port a child bound, from the line it logs once listening (`<what> listening
/// addr=HOST:PORT …`; both `berth-scheduler` and `berth-api` log it). The children are started
/// on port 0, so no port is picked here and released for them to take (which races).
pub async fn bound_port(log: &Path, what: &str) -> Result<u16> {
    let marker = format!("{what} listening");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let port = text
            .lines()
            .filter(|l| l.contains(&marker))
            .filter_map(|l| l.split_once("addr=").map(|(_, rest)| rest))
            .filter_map(|rest| rest.split_whitespace().next())
            .filter_map(|addr| addr.rsplit(':').next().and_then(|p| p.parse().ok()))
            .next_back();
        if let Some(port) = port {
            return Ok(port);
        }
        if Instant::now() > deadline {
            bail!(
                "no `{marker} addr=` line in {} after 20 s:\n{text}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

static FLEET_SEQ: AtomicU32 = AtomicU32::new(0);

pub struct AgentSpec {
    pub region: &'static str,
    pub memory_mib: u64,
    pub max_runs: u32,
}

impl AgentSpec {
    pub fn new(region: &'static str) -> AgentSpec {
        AgentSpec {
            region,
            memory_mib: 4096,
            max_runs: 8,
        }
    }
}

struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    /// `kill -SIGNAL` ("STOP", "CONT", "KILL", …); a killed process is reaped.
    fn signal(&mut self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()?;
        ensure!(status.success(), "kill -{signal} failed");
        if signal == "KILL" {
            self.child.wait()?;
        }
        Ok(())
    }
}

/// How a fleet is started, beyond its agents.
#[derive(Debug, Clone, Default)]
pub struct FleetOptions {
    /// Extra `berth-scheduler` flags.
    pub scheduler_args: Vec<String>,
    /// Host the scheduler and the API listen on (default 127.0.0.1; clients always connect
    /// through 127.0.0.1).
    pub listen_host: Option<String>,
    /// Extra `berth-api` flags.
    pub api_args: Vec<String>,
    /// The containerd socket the agents use (and the containerd helpers below look at), instead
    /// of the shared one from `BERTH_CONTAINERD_SOCKET`: for a test that restarts its own.
    pub containerd_socket: Option<String>,
    /// Reserve a second scheduler address and give the API and the agents both
    /// (`--scheduler http://first,http://second`); nothing listens on the second until
    /// [`Fleet::start_standby`], as with a standby that has not won the election.
    pub standby_scheduler: bool,
    /// The schedulers' `--store` (e.g. an etcd cluster's `etcd://…`): both schedulers share it
    /// and one secret key file, campaign for leadership, and only the leader listens.
    pub store: Option<String>,
    /// TLS on the gRPC hops: a CA and a scheduler certificate (`berthctl admin tls init`), the
    /// schedulers serve with it, the API and the agents verify it (`https://` URLs). Needed for
    /// a scheduler that listens beyond loopback.
    pub tls: bool,
    /// Networks the agents keep attached ahead (`--warm-networks`; 0, the default here, so a
    /// killed test agent leaves none behind). With some, dropping the fleet stops the agents
    /// with SIGTERM first, which releases them.
    pub warm_networks: usize,
    /// Environment variables for every process of the fleet (restarts included).
    pub env: Vec<(String, String)>,
}

/// A process that is killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The isolation every runner a test creates gets unless the test names one:
/// `BERTH_TEST_ISOLATION` (`container` or `sandbox`). deploy/test.sh runs the run-path suites
/// once as they are (runc) and once with `sandbox` (gVisor): one suite, both runtimes.
pub fn test_isolation() -> Option<String> {
    std::env::var("BERTH_TEST_ISOLATION")
        .ok()
        .filter(|v| !v.is_empty())
}

/// Whether this process runs its runners sandboxed (see [`test_isolation`]).
pub fn sandboxed() -> bool {
    test_isolation().as_deref() == Some("sandbox")
}

pub struct Fleet {
    pub env: Env,
    pub dir: tempfile::TempDir,
    pub api_url: String,
    pub scheduler_addr: String,
    /// The second scheduler address (with [`FleetOptions::standby_scheduler`]).
    pub standby_addr: Option<String>,
    /// Holds the second address's port (bound, not listening: connects are refused) until the
    /// standby takes it, so nothing else is given that port meanwhile.
    standby_reservation: Option<tokio::net::TcpSocket>,
    /// On etcd, the first scheduler's port, held for the fleet's life: a candidate binds its
    /// port each time it wins, so port 0 would move it to a new port on its second term.
    scheduler_reservation: Option<tokio::net::TcpSocket>,
    standby: Option<Proc>,
    store: Option<String>,
    /// (node id, region)
    pub nodes: Vec<(String, String)>,
    scheduler: Option<Proc>,
    scheduler_args: Vec<String>,
    /// With [`FleetOptions::tls`]: where `ca.pem`, `scheduler.pem` and `scheduler.key` are.
    pub tls_dir: Option<PathBuf>,
    listen_host: String,
    others: Vec<Proc>,
    /// node id → (its process, the arguments to start it again)
    agents: std::collections::HashMap<String, (Proc, Vec<String>)>,
    /// [`FleetOptions::warm_networks`].
    warm_networks: usize,
    /// [`FleetOptions::env`].
    proc_env: Vec<(String, String)>,
    pub http: reqwest::Client,
}

impl Fleet {
    /// A scheduler, an API and one agent per spec; waits until every node has registered.
    pub async fn start(agents: &[AgentSpec]) -> Result<Fleet> {
        Fleet::start_with(agents, &[]).await
    }

    /// Like [`Fleet::start`], with extra `berth-scheduler` flags.
    pub async fn start_with(agents: &[AgentSpec], scheduler_args: &[&str]) -> Result<Fleet> {
        Fleet::start_opts(
            agents,
            FleetOptions {
                scheduler_args: scheduler_args.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            },
        )
        .await
    }

    /// Like [`Fleet::start`], with [`FleetOptions`].
    pub async fn start_opts(agents: &[AgentSpec], options: FleetOptions) -> Result<Fleet> {
        let mut env = env()?;
        if let Some(socket) = options.containerd_socket {
            env.containerd_socket = socket;
        }
        let listen_host = options
            .listen_host
            .unwrap_or_else(|| "127.0.0.1".to_string());
        let dir = tempfile::tempdir()?;
        let seq = FLEET_SEQ.fetch_add(1, Ordering::SeqCst);
        let tag = format!("e{}x{}", std::process::id(), seq);
        let mut fleet = Fleet {
            // Both known once the processes have bound port 0 and said which port they got.
            api_url: String::new(),
            scheduler_addr: String::new(),
            standby_addr: None,
            standby_reservation: None,
            scheduler_reservation: None,
            standby: None,
            store: options.store,
            nodes: vec![],
            scheduler: None,
            scheduler_args: options.scheduler_args,
            tls_dir: None,
            listen_host,
            others: vec![],
            agents: std::collections::HashMap::new(),
            warm_networks: options.warm_networks,
            proc_env: options.env,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            env,
            dir,
        };
        if fleet.store.is_some() {
            let (socket, addr) = reserve_port()?;
            fleet.scheduler_addr = addr;
            fleet.scheduler_reservation = Some(socket);
        }
        if options.tls {
            let tls = fleet.dir.path().join("tls");
            fleet.tls_init(&tls)?;
            fleet.tls_dir = Some(tls);
        }
        fleet.start_scheduler()?;
        let port = bound_port(&fleet.log_path("scheduler"), "scheduler").await?;
        // Restarts reuse this port: the API and the agents know the scheduler by it.
        fleet.scheduler_addr = format!("127.0.0.1:{port}");
        if options.standby_scheduler {
            let (socket, addr) = reserve_port()?;
            fleet.standby_addr = Some(addr);
            fleet.standby_reservation = Some(socket);
        }
        let schedulers = fleet.scheduler_urls();
        let api_listen = format!("{}:0", fleet.listen_host);
        let mut api_args: Vec<String> = ["--listen", &api_listen, "--scheduler", &schedulers]
            .iter()
            .map(|a| a.to_string())
            .collect();
        api_args.extend(fleet.tls_ca_args());
        api_args.extend(options.api_args);
        let api = fleet.spawn_owned("api", "berth-api", &api_args)?;
        fleet.others.push(api);
        let port = bound_port(&fleet.log_path("api"), "api").await?;
        // Clients always connect through 127.0.0.1, whatever host the API listens on.
        fleet.api_url = format!("http://127.0.0.1:{port}");
        for (i, a) in agents.iter().enumerate() {
            let node_id = format!("{tag}-{}{i}", a.region);
            let state_dir = fleet.dir.path().join(format!("agent-{node_id}"));
            let token_file = fleet.registration_token_file(a.region).await?;
            let (mem, max) = (a.memory_mib.to_string(), a.max_runs.to_string());
            let args = [
                "--scheduler",
                &schedulers,
                "--node-id",
                &node_id,
                "--region",
                a.region,
                "--memory-mib",
                &mem,
                "--cpus",
                "2",
                "--max-runs",
                &max,
                "--containerd-socket",
                &fleet.env.containerd_socket,
                "--state-dir",
                &state_dir.to_string_lossy(),
                "--registration-token-file",
                &token_file.to_string_lossy(),
            ];
            let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            args.extend(fleet.tls_ca_args());
            args.extend([
                "--warm-networks".to_owned(),
                options.warm_networks.to_string(),
            ]);
            let p = fleet.spawn_owned(&format!("agent-{node_id}"), "berth-node-agent", &args)?;
            fleet.agents.insert(node_id.clone(), (p, args));
            fleet.nodes.push((node_id, a.region.to_owned()));
        }
        fleet.wait_ready().await?;
        Ok(fleet)
    }

    /// A file holding a registration token for `region` (created through the API, as an
    /// operator would), for agents to enroll with.
    pub async fn registration_token_file(&self, region: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(format!("registration-{region}.token"));
        if !path.exists() {
            let created = self
                .post(
                    "/v1/admin/registration_tokens",
                    serde_json::json!({"region": region, "name": "e2e"}),
                )
                .await?;
            let token = created["token"]
                .as_str()
                .with_context(|| format!("no token in {created}"))?;
            std::fs::write(&path, token)?;
        }
        Ok(path)
    }

    /// A node credential for a hand-made agent session as `node_id` in `region` (enrolled once
    /// per fleet and node id, as a real agent does; later calls read it back).
    pub async fn node_credential(&self, node_id: &str, region: &str) -> Result<String> {
        let path = self.dir.path().join(format!("fake-{node_id}.credential"));
        if let Ok(credential) = std::fs::read_to_string(&path) {
            return Ok(credential);
        }
        let token = std::fs::read_to_string(self.registration_token_file(region).await?)?;
        let channel = self.scheduler_channel().await?;
        let enrolled = berth_proto::v1::agent_service_client::AgentServiceClient::new(channel)
            .enroll(berth_proto::v1::EnrollRequest {
                registration_token: token.trim().to_owned(),
                node_id: node_id.to_owned(),
                region: region.to_owned(),
            })
            .await?
            .into_inner();
        std::fs::write(&path, &enrolled.node_credential)?;
        Ok(enrolled.node_credential)
    }

    /// Starts an agent outside the fleet's bookkeeping (no network, 1 GiB, one CPU), with its
    /// state under `<name>-state` and its log in `<name>.log`; killed when the answer drops.
    pub fn spawn_loose_agent(
        &self,
        name: &str,
        node_id: &str,
        region: &str,
        scheduler: &str,
        extra: &[&str],
    ) -> Result<Killed> {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log")))?;
        let state = self.dir.path().join(format!("{name}-state"));
        Ok(Killed(
            Command::new(self.env.bin_dir.join("berth-node-agent"))
                .args([
                    "--scheduler",
                    scheduler,
                    "--node-id",
                    node_id,
                    "--region",
                    region,
                ])
                .args(["--memory-mib", "1024", "--cpus", "1", "--network", "none"])
                .args(["--containerd-socket", &self.env.containerd_socket])
                .arg("--state-dir")
                .arg(&state)
                .args(extra)
                .env_remove("BERTH_CLUSTER_TOKEN")
                .env_remove("BERTH_REGISTRATION_TOKEN")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        ))
    }

    fn spawn_owned(&self, name: &str, bin: &str, args: &[String]) -> Result<Proc> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(name, bin, &args)
    }

    /// Sends a signal (e.g. "STOP", "CONT", "KILL") to a node's agent.
    pub fn signal_agent(&mut self, node_id: &str, signal: &str) -> Result<()> {
        let (p, _) = self
            .agents
            .get_mut(node_id)
            .with_context(|| format!("no agent {node_id}"))?;
        p.signal(signal)
    }

    /// Waits until a node's agent process has exited by itself (e.g. after SIGTERM) and returns
    /// its exit status.
    pub async fn wait_agent_exit(
        &mut self,
        node_id: &str,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let (p, _) = self
                .agents
                .get_mut(node_id)
                .with_context(|| format!("no agent {node_id}"))?;
            if let Some(status) = p.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the agent of {node_id} still runs {timeout:?} later");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a node's agent again with its original arguments (after `signal_agent(.., "KILL")`).
    pub fn restart_agent(&mut self, node_id: &str) -> Result<()> {
        let args = self
            .agents
            .get(node_id)
            .map(|(_, a)| a.clone())
            .with_context(|| format!("no agent {node_id}"))?;
        let p = self.spawn_owned(&format!("agent-{node_id}"), "berth-node-agent", &args)?;
        if let Some((mut old, _)) = self.agents.insert(node_id.to_owned(), (p, args)) {
            let _ = old.child.kill();
            let _ = old.child.wait();
        }
        Ok(())
    }

    /// Restarts a node's agent with `extra` arguments after its original ones, and waits until
    /// the new process has registered with the scheduler.
    pub async fn restart_agent_with(&mut self, node_id: &str, extra: &[&str]) -> Result<()> {
        let log = self.dir.path().join(format!("agent-{node_id}.log"));
        let registrations = || {
            std::fs::read_to_string(&log)
                .map_or(0, |l| l.matches("registered with scheduler").count())
        };
        let before = registrations();
        if let Some((_, args)) = self.agents.get_mut(node_id) {
            args.extend(extra.iter().map(|a| a.to_string()));
        }
        self.signal_agent(node_id, "KILL")?;
        self.restart_agent(node_id)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while registrations() <= before {
            ensure!(
                Instant::now() < deadline,
                "agent {node_id} did not register again\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn spawn(&self, name: &str, bin: &str, args: &[&str]) -> Result<Proc> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))?;
        let mut command = Command::new(self.env.bin_dir.join(bin));
        // Secrets travel in the environment, never on a command line; only the API and the
        // schedulers hold the cluster token, only the API the admin token.
        command
            .env_remove("BERTH_TOKEN")
            .env_remove("BERTH_CLUSTER_TOKEN");
        // Hermetic: no config file of this machine (/etc/berth/<daemon>.toml, e.g. left by a
        // package install) adds settings to the test's processes; an empty one is named instead.
        for var in [
            "BERTH_SCHEDULER_CONFIG",
            "BERTH_API_CONFIG",
            "BERTH_NODE_AGENT_CONFIG",
        ] {
            command.env(var, "/dev/null");
        }
        match bin {
            "berth-api" => {
                command
                    .env("BERTH_TOKEN", TOKEN)
                    .env("BERTH_CLUSTER_TOKEN", CLUSTER_TOKEN);
            }
            "berth-scheduler" => {
                command.env("BERTH_CLUSTER_TOKEN", CLUSTER_TOKEN);
            }
            _ => {}
        }
        let child = command
            .args(args)
            .envs(self.proc_env.iter().map(|(k, v)| (k, v)))
            .env("BERTH_LOG", "info")
            // Plain log lines: `bound_port` reads `addr=` from them.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {bin} from {}", self.env.bin_dir.display()))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
        })
    }

    /// What the API and the agents are given as `--scheduler`: the scheduler's URL, then the
    /// standby's (with [`FleetOptions::standby_scheduler`]).
    pub fn scheduler_urls(&self) -> String {
        let scheme = if self.tls_dir.is_some() {
            "https"
        } else {
            "http"
        };
        let mut urls = format!("{scheme}://{}", self.scheduler_addr);
        if let Some(standby) = &self.standby_addr {
            urls.push_str(&format!(",{scheme}://{standby}"));
        }
        urls
    }

    /// `--tls-ca <ca.pem>` for the API and the agents of a TLS fleet; nothing otherwise.
    pub fn tls_ca_args(&self) -> Vec<String> {
        match &self.tls_dir {
            Some(dir) => vec![
                "--tls-ca".to_owned(),
                dir.join("ca.pem").to_string_lossy().into_owned(),
            ],
            None => vec![],
        }
    }

    /// Makes a CA and a scheduler certificate for 127.0.0.1, ::1 and localhost in `dir`, as an
    /// operator would (`berthctl admin tls init`).
    pub fn tls_init(&self, dir: &Path) -> Result<()> {
        let out = Command::new(self.env.bin_dir.join("berthctl"))
            .args(["admin", "tls", "init", "--dir"])
            .arg(dir)
            .args([
                "--host",
                "127.0.0.1",
                "--host",
                "::1",
                "--host",
                "localhost",
            ])
            .env_remove("BERTH_URL")
            .env_remove("BERTH_TOKEN")
            .output()
            .context("running berthctl admin tls init")?;
        ensure!(
            out.status.success(),
            "berthctl admin tls init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// A channel to the first scheduler, over TLS in a TLS fleet.
    pub async fn scheduler_channel(&self) -> Result<tonic::transport::Channel> {
        let url = self
            .scheduler_urls()
            .split(',')
            .next()
            .unwrap_or_default()
            .to_owned();
        let mut endpoint = tonic::transport::Endpoint::from_shared(url)?;
        if let Some(dir) = &self.tls_dir {
            let ca = std::fs::read(dir.join("ca.pem"))?;
            endpoint = endpoint.tls_config(berth_core::tls::client_config(&ca))?;
        }
        Ok(endpoint.connect().await?)
    }

    /// The first scheduler's data directory (its embedded store and secret key).
    pub fn scheduler_data_dir(&self) -> PathBuf {
        self.dir.path().join("scheduler")
    }

    pub fn start_scheduler(&mut self) -> Result<()> {
        let data = self.scheduler_data_dir();
        // Port 0 on the first start; a restart takes the port the first start was given.
        let port = self.scheduler_addr.rsplit(':').next().unwrap_or("0");
        let port = if port.is_empty() { "0" } else { port };
        let listen = format!("{}:{port}", self.listen_host);
        let args = self.scheduler_command(&listen, &data);
        let p = self.spawn_owned("scheduler", "berth-scheduler", &args)?;
        self.scheduler = Some(p);
        Ok(())
    }

    /// Starts a second scheduler on the standby address over `data_dir`, as a takeover would
    /// (the same embedded store as the first, once the first is dead and its file lock gone; or
    /// a copy), and waits until it listens. Returns when it listens.
    pub async fn start_standby(&mut self, data_dir: &Path) -> Result<Instant> {
        let addr = self
            .standby_addr
            .clone()
            .context("the fleet has no standby address (FleetOptions::standby_scheduler)")?;
        let args = self.scheduler_command(&addr, data_dir);
        let p = self.spawn_owned("scheduler-standby", "berth-scheduler", &args)?;
        self.standby = Some(p);
        bound_port(&self.log_path("scheduler-standby"), "scheduler").await?;
        let listening = Instant::now();
        self.standby_reservation = None;
        Ok(listening)
    }

    /// Sends a signal ("STOP", "CONT", "KILL", …) to the first scheduler.
    pub fn signal_scheduler(&mut self, signal: &str) -> Result<()> {
        self.signal_slot(0, signal)
    }

    /// The text a process of the fleet logged so far ("scheduler", "scheduler-standby", "api",
    /// "agent-<node id>").
    pub fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    fn scheduler_command(&self, listen: &str, data: &Path) -> Vec<String> {
        let tls: Vec<String> = match &self.tls_dir {
            Some(dir) => vec![
                format!("--tls-cert={}", dir.join("scheduler.pem").display()),
                format!("--tls-key={}", dir.join("scheduler.key").display()),
            ],
            None => vec![],
        };
        let mut args: Vec<String> = [
            "--grpc-listen",
            listen,
            "--data-dir",
            &data.to_string_lossy(),
            "--default-registry",
            &self.env.registry,
            "--heartbeat-interval-seconds",
            "1",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        if let Some(store) = &self.store {
            let key = self.dir.path().join("secret.key");
            args.extend([
                format!("--store={store}"),
                format!("--secret-key-file={}", key.display()),
            ]);
        }
        args.extend(tls);
        args.extend(self.scheduler_args.iter().cloned());
        args
    }

    /// The address of scheduler slot `i`: 0 is the first scheduler, 1 the standby address.
    pub fn slot_addr(&self, i: usize) -> Option<String> {
        match i {
            0 => Some(self.scheduler_addr.clone()),
            1 => self.standby_addr.clone(),
            _ => None,
        }
    }

    fn slot_proc(&mut self, i: usize) -> Result<&mut Option<Proc>> {
        match i {
            0 => Ok(&mut self.scheduler),
            1 => Ok(&mut self.standby),
            _ => bail!("no scheduler slot {i}"),
        }
    }

    fn slot_name(i: usize) -> &'static str {
        if i == 0 {
            "scheduler"
        } else {
            "scheduler-standby"
        }
    }

    /// The slot whose address accepts connections: the leader (only it listens), if any.
    pub fn leader_slot(&self) -> Option<usize> {
        (0..2).find(|&i| {
            self.slot_addr(i).is_some_and(|a| {
                a.parse::<std::net::SocketAddr>().is_ok_and(|addr| {
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                })
            })
        })
    }

    /// Waits until some slot leads and returns it.
    pub async fn wait_leader(&self, within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.leader_slot() {
                return Ok(i);
            }
            ensure!(
                Instant::now() < deadline,
                "no scheduler leads after {within:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts scheduler slot `i` as a candidate for leadership (with [`FleetOptions::store`] on
    /// etcd) and waits until it campaigns; it listens only once it leads.
    pub async fn start_candidate(&mut self, i: usize) -> Result<()> {
        let addr = self.slot_addr(i).context("no such scheduler slot")?;
        let name = Fleet::slot_name(i);
        let data = self.dir.path().join(name);
        let campaigns = || self.log_of(name).matches("standby: campaigning").count();
        let before = campaigns();
        let args = self.scheduler_command(&addr, &data);
        let p = self.spawn_owned(name, "berth-scheduler", &args)?;
        if let Some(mut old) = self.slot_proc(i)?.replace(p) {
            let _ = old.child.kill();
            let _ = old.child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log_of(name).matches("standby: campaigning").count() <= before {
            ensure!(
                Instant::now() < deadline,
                "{name} never campaigned\n{}",
                self.log_of(name)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Sends a signal ("STOP", "CONT", "KILL", …) to scheduler slot `i`; KILL also reaps it.
    pub fn signal_slot(&mut self, i: usize, signal: &str) -> Result<()> {
        let slot = self.slot_proc(i)?;
        slot.as_mut()
            .context("that scheduler is not running")?
            .signal(signal)?;
        if signal == "KILL" {
            *slot = None;
        }
        Ok(())
    }

    /// Whether scheduler slot `i`'s process still runs.
    pub fn slot_running(&mut self, i: usize) -> bool {
        self.slot_proc(i)
            .ok()
            .and_then(|s| s.as_mut())
            .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// SIGKILL, as a crash would.
    pub fn kill_scheduler(&mut self) -> Result<()> {
        if let Some(mut p) = self.scheduler.take() {
            p.child.kill()?;
            p.child.wait()?;
        }
        Ok(())
    }

    /// `node_id` as `GET /v1/nodes` shows it; None when it is not listed.
    pub async fn node_view(&self, node_id: &str) -> Result<Option<Value>> {
        let v = self.get("/v1/nodes").await?;
        Ok(v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["id"] == node_id)
            .cloned())
    }

    /// The images `node_id` reports holding (the scheduler's view, for image locality).
    pub async fn cached_images(&self, node_id: &str) -> Result<Vec<String>> {
        let node = self.node_view(node_id).await?.unwrap_or_default();
        Ok(node["cached_images"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect())
    }

    /// Waits until `node_id` has `status` in `GET /v1/nodes`.
    pub async fn wait_node_status(
        &self,
        node_id: &str,
        status: &str,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.node_view(node_id).await?;
            if let Some(n) = found.as_ref().filter(|n| n["status"] == status) {
                return Ok(n.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {node_id} not {status} after {timeout:?}: {found:?}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_ready(&self) -> Result<()> {
        let want: Vec<&str> = self.nodes.iter().map(|(id, _)| id.as_str()).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(v) = self.get("/v1/nodes").await {
                let ready: Vec<String> = v["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|n| n["status"] == "ready")
                    .filter_map(|n| n["id"].as_str().map(str::to_owned))
                    .collect();
                if want.iter().all(|w| ready.iter().any(|r| r == w)) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("fleet not ready after 30 s:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every process's log, for failure messages.
    /// The lines of the fleet's logs that mention `needle` (a run id, say), at most `max` per
    /// file, each under its file's name.
    pub fn log_lines_about(&self, needle: &str, max: usize) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    for l in text.lines().filter(|l| l.contains(needle)).take(max) {
                        out.push_str(&format!("[{}] {l}\n", p.display()));
                    }
                }
            }
        }
        out
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    out.push_str(&format!("---- {}\n", p.display()));
                    for l in tail.into_iter().rev() {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }

    pub fn node(&self, region: &str) -> &str {
        self.nodes
            .iter()
            .find(|(_, r)| r == region)
            .map(|(id, _)| id.as_str())
            .unwrap_or("")
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.api_url))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let text = res.text().await?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| format!("body: {text}"))?
        };
        Ok((status, value))
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        let (status, v) = self.request(reqwest::Method::GET, path, None).await?;
        if status != 200 {
            bail!("GET {path} answered {status}: {v}");
        }
        Ok(v)
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        let (status, v) = self
            .request(reqwest::Method::POST, path, Some(body))
            .await?;
        if !(200..300).contains(&status) {
            bail!("POST {path} answered {status}: {v}");
        }
        Ok(v)
    }

    /// Creates a busybox runner; `extra` fields override the defaults.
    pub async fn runner(&self, region: &str, extra: Value) -> Result<String> {
        let mut body = json!({
            "name": "e2e-runner",
            "image_name": "busybox",
            "image_tag": "latest",
            "region": region,
            "instance_type": "standard-s",
            "timeout_seconds": 120,
        });
        if let (Some(b), Some(isolation)) = (body.as_object_mut(), test_isolation()) {
            b.insert("isolation".into(), isolation.into());
        }
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let v = self.post("/v1/runners", body).await?;
        v["runner"]["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no runner id in {v}"))
    }

    pub async fn start_run(&self, runner: &str, body: Value) -> Result<String> {
        let v = self
            .post(&format!("/v1/runners/{runner}/runs"), body)
            .await?;
        v["run"]["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no run id in {v}"))
    }

    pub async fn run(&self, runner: &str, run: &str) -> Result<Value> {
        Ok(self
            .get(&format!("/v1/runners/{runner}/runs/{run}"))
            .await?["run"]
            .clone())
    }

    /// Polls until the run's status satisfies `done`.
    pub async fn wait_for(
        &self,
        runner: &str,
        run: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.run(runner, run).await?;
            if done(r["status"].as_str().unwrap_or("")) {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!(
                    "run {run} still {} after {timeout:?}: {r}\n{}",
                    r["status"],
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_finished(&self, runner: &str, run: &str) -> Result<Value> {
        self.wait_for(runner, run, Duration::from_secs(60), |s| {
            matches!(s, "succeeded" | "failed" | "canceled")
        })
        .await
    }

    /// Every log line of a run, through the paginated endpoint.
    pub async fn all_logs(&self, runner: &str, run: &str) -> Result<Vec<Value>> {
        let mut out = vec![];
        let mut after = 0u64;
        loop {
            let v = self
                .get(&format!(
                    "/v1/runners/{runner}/runs/{run}/logs?after_id={after}&limit=1000"
                ))
                .await?;
            let page = v["logs"].as_array().cloned().unwrap_or_default();
            if let Some(last) = page.last() {
                after = last["id"].as_u64().unwrap_or(after);
            }
            out.extend(page);
            if v["has_more"] != json!(true) {
                return Ok(out);
            }
        }
    }

    /// Containers containerd holds in a node's namespace.
    pub async fn containers(&self, node_id: &str) -> Result<Vec<String>> {
        use containerd_client::services::v1::{
            containers_client::ContainersClient, ListContainersRequest,
        };
        let channel = containerd_client::connect(&self.env.containerd_socket).await?;
        let mut client = ContainersClient::new(channel);
        let mut req = tonic::Request::new(ListContainersRequest { filters: vec![] });
        req.metadata_mut()
            .insert("containerd-namespace", format!("berth-{node_id}").parse()?);
        let list = client.list(req).await?.into_inner();
        Ok(list.containers.into_iter().map(|c| c.id).collect())
    }

    /// Waits (up to 15 s) until containerd holds no container in the node's namespace.
    pub async fn wait_no_containers(&self, node_id: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = self.containers(node_id).await?;
            if left.is_empty() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "containers left on {node_id}: {left:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A node agent's state directory (per-run journals, output and uploaded files, resolv.conf).
    pub fn agent_state_dir(&self, node_id: &str) -> PathBuf {
        self.dir.path().join(format!("agent-{node_id}"))
    }

    /// The port in an `host:port` address of this fleet (`scheduler_addr`, the API's URL).
    pub fn port_of(addr: &str) -> Result<u16> {
        addr.trim_end_matches('/')
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no port in {addr}"))
    }

    pub fn cgroup_dir(&self, controller: &str, node_id: &str, run_id: &str) -> PathBuf {
        Path::new("/sys/fs/cgroup")
            .join(controller)
            .join("berth")
            .join(node_id)
            .join(run_id)
    }

    /// The directory an agent keeps a run's journal, output and uploaded files in.
    pub fn run_state_dir(&self, node_id: &str, run_id: &str) -> PathBuf {
        self.agent_state_dir(node_id).join("runs").join(run_id)
    }

    /// What a run left behind on its node, one description per thing: its task, container,
    /// snapshot or lease in containerd, the shim's bundle directory, a cgroup directory in any
    /// controller, its directory in the agent's state dir (output files, line log, uploaded
    /// files). Empty once the run is fully cleaned up.
    pub async fn run_leftovers(&self, node_id: &str, run_id: &str) -> Result<Vec<String>> {
        use containerd_client::services::v1::{
            containers_client::ContainersClient, leases_client::LeasesClient,
            snapshots::snapshots_client::SnapshotsClient, snapshots::StatSnapshotRequest,
            tasks_client::TasksClient, GetContainerRequest, GetRequest, ListRequest,
        };
        let channel = containerd_client::connect(&self.env.containerd_socket).await?;
        let ns: tonic::metadata::MetadataValue<_> = format!("berth-{node_id}").parse()?;
        fn in_ns<T>(
            ns: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
            m: T,
        ) -> tonic::Request<T> {
            let mut r = tonic::Request::new(m);
            r.metadata_mut().insert("containerd-namespace", ns.clone());
            r
        }
        let mut left = vec![];
        let mut note = |what: &str, res: std::result::Result<(), tonic::Status>| match res {
            Ok(()) => left.push(what.to_owned()),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => left.push(format!("{what}: cannot tell: {s}")),
        };
        let task = TasksClient::new(channel.clone())
            .get(in_ns(
                &ns,
                GetRequest {
                    container_id: run_id.to_owned(),
                    exec_id: String::new(),
                },
            ))
            .await;
        note("task", task.map(|_| ()));
        let container = ContainersClient::new(channel.clone())
            .get(in_ns(
                &ns,
                GetContainerRequest {
                    id: run_id.to_owned(),
                },
            ))
            .await;
        note("container", container.map(|_| ()));
        let snapshot = SnapshotsClient::new(channel.clone())
            .stat(in_ns(
                &ns,
                StatSnapshotRequest {
                    snapshotter: "overlayfs".to_owned(),
                    key: run_id.to_owned(),
                },
            ))
            .await;
        note("snapshot", snapshot.map(|_| ()));
        let leases = LeasesClient::new(channel)
            .list(in_ns(
                &ns,
                ListRequest {
                    filters: vec![format!("id==berth-run-{run_id}")],
                },
            ))
            .await?
            .into_inner()
            .leases;
        if !leases.is_empty() {
            left.push(format!("lease berth-run-{run_id}"));
        }
        // The shim's bundle (with its FIFOs and runc state), where deploy/lib.sh puts
        // containerd's state: next to its socket.
        if let Some(dir) = Path::new(&self.env.containerd_socket).parent() {
            let bundle = dir
                .join("state/io.containerd.runtime.v2.task")
                .join(format!("berth-{node_id}"))
                .join(run_id);
            if bundle.exists() {
                left.push(format!("shim bundle {}", bundle.display()));
            }
        }
        // Every cgroup v1 controller, and the unified (v2) hierarchy itself.
        let roots = std::fs::read_dir("/sys/fs/cgroup")?
            .flatten()
            .map(|c| c.path())
            .chain([PathBuf::from("/sys/fs/cgroup")]);
        for root in roots {
            let dir = root.join("berth").join(node_id).join(run_id);
            if dir.exists() {
                left.push(format!("cgroup {}", dir.display()));
            }
        }
        let state = self.run_state_dir(node_id, run_id);
        if state.exists() {
            let inside: Vec<String> = std::fs::read_dir(&state)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            left.push(format!("agent state {} {inside:?}", state.display()));
        }
        Ok(left)
    }

    /// Asserts that a run which ended left nothing behind on its node (see [`run_leftovers`]):
    /// no task, container, snapshot, lease, shim bundle, cgroup directory, output file or
    /// uploaded file. The agent forgets a run's directory once the scheduler acknowledged its
    /// exit, so this waits (up to 15 s) for that before failing.
    pub async fn assert_run_cleaned(&self, node_id: &str, run_id: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = self.run_leftovers(node_id, run_id).await?;
            if left.is_empty() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "run {run_id} left behind on {node_id}: {left:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Standard base64 with padding (what the API takes), written here so the test depends on no
/// encoder of the code under test.
pub fn b64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= n {
                out.push(ABC[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A loopback port bound (not listening: connects are refused) so nothing else is given it;
/// SO_REUSEADDR on both sides lets a scheduler bind it while the returned socket holds it.
fn reserve_port() -> Result<(tokio::net::TcpSocket, String)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let addr = format!("127.0.0.1:{}", socket.local_addr()?.port());
    Ok((socket, addr))
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // BERTH_TEST_KEEP_LOGS=DIR keeps every process's log for a look after the test.
        if let Ok(keep) = std::env::var("BERTH_TEST_KEEP_LOGS") {
            let to = Path::new(&keep).join(self.dir.path().file_name().unwrap_or_default());
            if std::fs::create_dir_all(&to).is_ok() {
                if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
                    for e in entries.flatten() {
                        if e.path().extension().is_some_and(|x| x == "log") {
                            let _ = std::fs::copy(e.path(), to.join(e.file_name()));
                        }
                    }
                }
            }
        }
        if self.warm_networks > 0 {
            // SIGTERM first: the agents release their networks attached ahead at once (then
            // drain, which is not waited for). Releasing runs the CNI plugins, which may wait
            // for the iptables lock while other tests' fleets hold it.
            for (p, _) in self.agents.values_mut() {
                let _ = p.signal("TERM");
            }
            // Slots runs still hold go with those runs (like a run's own network, they stay
            // when the agent is killed mid-run); only the ready ones are waited for.
            let ready_left = |node: &str| {
                let held: Vec<String> =
                    std::fs::read_dir(self.agent_state_dir(node).join("network-slots"))
                        .map(|d| {
                            d.flatten()
                                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                                .map(|s| s.trim().to_owned())
                                .collect()
                        })
                        .unwrap_or_default();
                std::fs::read_dir(Path::new("/run/berth/netns").join(node))
                    .map(|d| {
                        d.flatten()
                            .filter_map(|e| e.file_name().into_string().ok())
                            .any(|n| {
                                n.starts_with("warm-") && !held.iter().any(|h| n.starts_with(h))
                            })
                    })
                    .unwrap_or(false)
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && self.nodes.iter().any(|(node, _)| ready_left(node)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let agents = self.agents.values_mut().map(|(p, _)| p);
        let procs = self
            .others
            .iter_mut()
            .chain(agents)
            .chain(self.scheduler.iter_mut())
            .chain(self.standby.iter_mut());
        for p in procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
            let _ = &p.name;
        }
    }
}

/// The messages of one stream (`stdout` or `stderr`) among a run's log entries, in order.
pub fn msgs(logs: &[Value], stream: &str) -> Vec<String> {
    logs.iter()
        .filter(|l| l["stream"] == stream)
        .filter_map(|l| l["msg"].as_str().map(str::to_owned))
        .collect()
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// Reads a whole SSE stream (until the server closes it or `timeout`).
pub async fn read_sse(
    fleet: &Fleet,
    path: &str,
    last_event_id: Option<&str>,
    timeout: Duration,
) -> Result<Vec<SseEvent>> {
    read_sse_at(
        fleet.http.clone(),
        format!("{}{path}", fleet.api_url),
        last_event_id.map(str::to_owned),
        timeout,
    )
    .await
}

/// [`read_sse`] without borrowing the fleet, so a stream can stay open while the test stops and
/// starts the fleet's processes.
pub async fn read_sse_at(
    http: reqwest::Client,
    url: String,
    last_event_id: Option<String>,
    timeout: Duration,
) -> Result<Vec<SseEvent>> {
    use futures::StreamExt;
    let mut req = http.get(&url).bearer_auth(TOKEN).timeout(timeout);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let res = req.send().await?;
    if res.status() != 200 {
        bail!("SSE {url} answered {}", res.status());
    }
    let mut body = res.bytes_stream();
    let mut buf = String::new();
    let mut events = vec![];
    let mut cur = SseEvent::default();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(pos) = buf.find('\n') {
            let line: String = buf.drain(..=pos).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !cur.event.is_empty() || !cur.data.is_empty() {
                    events.push(std::mem::take(&mut cur));
                }
            } else if let Some(v) = line.strip_prefix("event:") {
                cur.event = v.trim_start().to_owned();
            } else if let Some(v) = line.strip_prefix("id:") {
                cur.id = Some(v.trim_start().to_owned());
            } else if let Some(v) = line.strip_prefix("data:") {
                cur.data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
    }
    Ok(events)
}

/// Pid of the running process whose command line holds every one of `args`.
pub fn pid_with_args(args: &[&str]) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let words: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        args.iter()
            .all(|a| words.iter().any(|w| w.contains(a)))
            .then_some(pid)
    })
}
