//! The Debian packages as an operator gets them (issue #17): `deploy/package.sh` builds them,
//! `deploy/test.sh` names their directory in `BERTH_TEST_PACKAGES`, and this test unpacks them
//! into a scratch root and runs the fleet from there — the installed binaries, started from
//! config files (this machine has no systemd, so the test starts them as the units would):
//! the scheduler from the installed `/etc/berth/scheduler.toml` with environment overrides,
//! the API from a config file an operator would write, a node that joins with
//! `berth-node-agent join`, a job run through the installed `berthctl`, then `leave` and
//! `berthctl nodes remove`.

mod common;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The admin token the API is given (by file) and the test presents.
const TOKEN: &str = "packages-admin-token-0123456789";
const CLUSTER_TOKEN: &str = "packages-cluster-token-0123456789";

/// A child killed when dropped (a test that fails leaves no daemon behind).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Installed {
    root: tempfile::TempDir,
    work: tempfile::TempDir,
    env: common::Env,
}

impl Installed {
    fn bin(&self, name: &str) -> PathBuf {
        self.root.path().join("usr/bin").join(name)
    }

    fn path(&self, p: &str) -> PathBuf {
        self.work.path().join(p)
    }

    /// Starts an installed daemon with only `env` of Berth's variables (none of the test's
    /// own reach it), its output in `<log>.log`.
    fn spawn(&self, bin: &str, args: &[&str], env: &[(&str, String)], log: &str) -> Result<Daemon> {
        let out = std::fs::File::create(self.path(&format!("{log}.log")))?;
        let mut cmd = Command::new(self.bin(bin));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        for (k, _) in std::env::vars() {
            if k.starts_with("BERTH_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        // Plain lines: `bound_port` reads `addr=` from them.
        cmd.env("NO_COLOR", "1").env("BERTH_LOG", "info");
        Ok(Daemon(
            cmd.spawn().with_context(|| format!("starting {bin}"))?,
        ))
    }

    /// Runs an installed command to its end, with the API's address and token for berthctl.
    fn run(&self, bin: &str, args: &[&str], api: &str) -> Result<Output> {
        let out = Command::new(self.bin(bin))
            .args(args)
            .env("BERTH_URL", api)
            .env("BERTH_TOKEN", TOKEN)
            .env_remove("BERTH_REGISTRATION_TOKEN")
            .env_remove("BERTH_NODE_AGENT_CONFIG")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {bin} {args:?}"))?;
        Ok(out)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Unpacks every `.deb` of `dir` into a fresh scratch root, as dpkg would place the files.
fn unpack(dir: &Path) -> Result<tempfile::TempDir> {
    let root = tempfile::tempdir()?;
    let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    debs.sort();
    let names: Vec<String> = debs
        .iter()
        .filter_map(|p| {
            p.file_name()?
                .to_str()?
                .split('_')
                .next()
                .map(str::to_owned)
        })
        .collect();
    for want in [
        "berth-api",
        "berth-node-agent",
        "berth-scheduler",
        "berthctl",
    ] {
        ensure!(
            names.iter().any(|n| n == want),
            "no {want} package in {} (found {names:?})",
            dir.display()
        );
    }
    for deb in &debs {
        let out = Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(root.path())
            .output()?;
        ensure!(
            out.status.success(),
            "dpkg-deb -x {}: {}",
            deb.display(),
            text(&out)
        );
    }
    Ok(root)
}

/// The units' directory in the scratch root (`/lib` or `/usr/lib`, as the packaging chose).
fn unit_dir(root: &Path) -> Result<PathBuf> {
    ["lib/systemd/system", "usr/lib/systemd/system"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.join("berth-node-agent.service").exists())
        .context("no berth-node-agent.service in the packages")
}

async fn api_json(
    api: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut req = http
        .request(method, format!("{api}{path}"))
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

/// The node as `berthctl nodes list --json` shows it, if listed.
fn listed(inst: &Installed, api: &str, node_id: &str) -> Result<Option<Value>> {
    let out = inst.run("berthctl", &["nodes", "list", "--json"], api)?;
    ensure!(out.status.success(), "berthctl nodes list: {}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| text(&out))?;
    let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
    Ok(nodes.into_iter().find(|n| n["id"] == node_id))
}

async fn wait_listed(
    inst: &Installed,
    api: &str,
    node_id: &str,
    status: Option<&str>,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let node = listed(inst, api, node_id)?;
        let ok = match status {
            Some(s) => node.as_ref().is_some_and(|n| n["status"] == s),
            None => node.is_none(),
        };
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "node {node_id} is {node:?}, expected {status:?}\n--- scheduler\n{}",
                inst.log("scheduler")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `berth-node-agent join` for `node_id`, writing `<node_id>.toml`; answers its output.
fn join(
    inst: &Installed,
    api: &str,
    scheduler: &str,
    node_id: &str,
    token_file: &Path,
) -> Result<Output> {
    let config = inst.path(&format!("{node_id}.toml"));
    let state = inst.path(&format!("{node_id}-state"));
    let socket = format!("containerd_socket={}", inst.env.containerd_socket);
    let token = token_file.display().to_string();
    let args = [
        "join",
        "--url",
        scheduler,
        "--token-file",
        &token,
        "--region",
        "fra",
        "--node-id",
        node_id,
        "--config",
        &config.display().to_string(),
        "--state-dir",
        &state.display().to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
        "--set",
        &socket,
        "--set",
        "memory_mib=2048",
        "--set",
        "cpus=2",
        "--set",
        "max_runs=4",
        "--wait-seconds",
        "30",
    ];
    inst.run("berth-node-agent", &args, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packages_install_and_a_node_joins_runs_a_job_and_leaves() -> Result<()> {
    let env = common::env()?;
    let debs = PathBuf::from(std::env::var("BERTH_TEST_PACKAGES").context(
        "BERTH_TEST_PACKAGES is not set: deploy/test.sh builds the packages (deploy/package.sh) and names their directory",
    )?);
    let root = unpack(&debs)?;
    let inst = Installed {
        root,
        work: tempfile::tempdir()?,
        env,
    };
    let units = unit_dir(inst.root.path())?;
    for unit in [
        "berth-scheduler.service",
        "berth-api.service",
        "berth-node-agent.service",
    ] {
        ensure!(units.join(unit).exists(), "{unit} is not in the packages");
    }
    for bin in [
        "berth-scheduler",
        "berth-api",
        "berth-node-agent",
        "berthctl",
    ] {
        let mode = std::fs::metadata(inst.bin(bin))?.permissions().mode();
        ensure!(mode & 0o111 != 0, "{bin} is not executable ({mode:o})");
    }
    let installed_config = inst.root.path().join("etc/berth/scheduler.toml");
    ensure!(
        installed_config.exists(),
        "the scheduler package has no /etc/berth/scheduler.toml"
    );

    // Secrets in files of their own, as the units expect them.
    let write_secret = |name: &str, value: &str| -> Result<PathBuf> {
        let p = inst.path(name);
        std::fs::write(&p, format!("{value}\n"))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        Ok(p)
    };
    let cluster_token = write_secret("cluster.token", CLUSTER_TOKEN)?;
    let admin_token = write_secret("admin.token", TOKEN)?;

    // The scheduler: the installed config file, with what must differ in a test (its port,
    // its data directory, the registry of the test images) from the environment.
    let _scheduler = inst.spawn(
        "berth-scheduler",
        &[],
        &[
            (
                "BERTH_SCHEDULER_CONFIG",
                installed_config.display().to_string(),
            ),
            ("BERTH_SCHEDULER_LISTEN", "127.0.0.1:0".into()),
            (
                "BERTH_SCHEDULER_DATA_DIR",
                inst.path("scheduler").display().to_string(),
            ),
            (
                "BERTH_CLUSTER_TOKEN_FILE",
                cluster_token.display().to_string(),
            ),
            ("BERTH_DEFAULT_REGISTRY", inst.env.registry.clone()),
        ],
        "scheduler",
    )?;
    let port = common::bound_port(&inst.path("scheduler.log"), "scheduler").await?;
    let scheduler = format!("http://127.0.0.1:{port}");

    // The API: a config file as an operator writes it.
    let api_config = inst.path("api.toml");
    std::fs::write(
        &api_config,
        format!(
            "listen = \"127.0.0.1:0\"\nscheduler = \"{scheduler}\"\ntoken_file = \"{}\"\ncluster_token_file = \"{}\"\nmax_streams_per_key = 8\n",
            admin_token.display(),
            cluster_token.display()
        ),
    )?;
    let _api = inst.spawn(
        "berth-api",
        &["--config", &api_config.display().to_string()],
        &[],
        "api",
    )?;
    let api_port = common::bound_port(&inst.path("api.log"), "api").await?;
    let api = format!("http://127.0.0.1:{api_port}");

    // A registration token for fra, as the README has the operator create it.
    let (status, created) = api_json(
        &api,
        reqwest::Method::POST,
        "/v1/admin/registration_tokens",
        Some(json!({"region": "fra", "name": "packages"})),
    )
    .await?;
    ensure!(status == 201 || status == 200, "token: {status} {created}");
    let token = created["token"].as_str().context("no token")?.to_owned();
    let token_file = write_secret("registration.token", &token)?;

    // Join: the config and the credential are written; without systemd the operator (here the
    // test) starts the agent.
    let node = format!("pkg-{}", std::process::id());
    let out = join(&inst, &api, &scheduler, &node, &token_file)?;
    ensure!(out.status.success(), "join: {}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("systemd does not run this machine"),
        "join did not say how to start the agent here: {}",
        text(&out)
    );
    let config = inst.path(&format!("{node}.toml"));
    let written = std::fs::read_to_string(&config)?;
    ensure!(
        written.contains(&format!("node_id = \"{node}\"")),
        "{written}"
    );
    ensure!(
        !written.contains(&token),
        "the registration token is in the config"
    );
    let credential = inst.path(&format!("{node}-state/node.credential"));
    let mode = std::fs::metadata(&credential)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "credential mode {mode:o}");
    // A second join of the same machine is refused without --force.
    let again = join(&inst, &api, &scheduler, &node, &token_file)?;
    ensure!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("has joined already"),
        "a second join: {}",
        text(&again)
    );

    let mut agent = inst.spawn(
        "berth-node-agent",
        &["--config", &config.display().to_string()],
        &[],
        &node,
    )?;
    wait_listed(&inst, &api, &node, Some("ready")).await?;

    // A job through the installed berthctl.
    let (status, runner) = api_json(
        &api,
        reqwest::Method::POST,
        "/v1/runners",
        Some(
            json!({"name": "packaged", "image_name": "busybox", "image_tag": "latest",
                    "region": "fra", "instance_type": "standard-xs", "timeout_seconds": 60,
                    "run_command": "echo default"}),
        ),
    )
    .await?;
    ensure!(status == 201 || status == 200, "runner: {status} {runner}");
    let runner_id = runner["runner"]["id"]
        .as_str()
        .context("runner id")?
        .to_owned();
    let out = inst.run(
        "berthctl",
        &[
            "run",
            &runner_id,
            "--follow",
            "--command",
            "echo hello from the packages",
        ],
        &api,
    )?;
    ensure!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("hello from the packages"),
        "berthctl run: {}\n--- agent\n{}",
        text(&out),
        inst.log(&node)
    );

    // Leave: drained, stopped (by its process ID file: no systemd here), removed, cleaned.
    let out = inst.run(
        "berth-node-agent",
        &[
            "leave",
            "--config",
            &config.display().to_string(),
            "--wait-seconds",
            "60",
        ],
        &api,
    )?;
    ensure!(
        out.status.success(),
        "leave: {}\n--- agent\n{}",
        text(&out),
        inst.log(&node)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(status) = agent.0.try_wait()? {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "the agent still runs after leave"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(exit.success(), "the agent exited {exit:?} after leave");
    ensure!(
        listed(&inst, &api, &node)?.is_none(),
        "node {node} is still listed after leave"
    );
    ensure!(
        !credential.exists() && !config.exists(),
        "leave left the credential or the config"
    );

    // An admin removes a node that is gone: join another, kill it, `berthctl nodes remove`.
    let lost = format!("pkg-lost-{}", std::process::id());
    let out = join(&inst, &api, &scheduler, &lost, &token_file)?;
    ensure!(out.status.success(), "join: {}", text(&out));
    let lost_config = inst.path(&format!("{lost}.toml")).display().to_string();
    let mut lost_agent = inst.spawn("berth-node-agent", &["--config", &lost_config], &[], &lost)?;
    wait_listed(&inst, &api, &lost, Some("ready")).await?;
    lost_agent.0.kill()?;
    lost_agent.0.wait()?;
    let out = inst.run("berthctl", &["nodes", "remove", &lost], &api)?;
    ensure!(
        out.status.success(),
        "berthctl nodes remove: {}",
        text(&out)
    );
    ensure!(
        listed(&inst, &api, &lost)?.is_none(),
        "{lost} is still listed after remove"
    );
    // Its credential went with it: the same agent started again is refused and not listed.
    let _back = inst.spawn(
        "berth-node-agent",
        &["--config", &lost_config],
        &[],
        &format!("{lost}-again"),
    )?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        listed(&inst, &api, &lost)?.is_none(),
        "a removed node came back with its old credential"
    );
    // A bad config file stops the daemon at once, naming the key (exit 78: no restart loop).
    std::fs::write(
        inst.path("bad.toml"),
        "region = \"fra\"\nnode_id = \"x\"\nmax_runs = \"lots\"\n",
    )?;
    let out = inst.run(
        "berth-node-agent",
        &["--config", &inst.path("bad.toml").display().to_string()],
        &api,
    )?;
    ensure!(
        out.status.code() == Some(78)
            && String::from_utf8_lossy(&out.stderr).contains("key `max_runs`"),
        "a bad config: {}",
        text(&out)
    );
    Ok(())
}
