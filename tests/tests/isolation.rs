//! End-to-end isolation of runs on a node (issue 4, item 4) against real containerd, runc, the
//! CNI plugins and iptables: a run reaches a server on another "host" (a network namespace this
//! test creates) but no port of its own host — not through the bridge's gateway address, not
//! through the host's own address — nor another run; it runs with the default capabilities,
//! no_new_privileges, a seccomp allowlist, masked and read-only kernel paths; two runs see neither
//! each other's processes nor files; and every run's namespace and address are released after it
//! ends, also when the agent was killed in between.
//!
//! The only traffic this sends leaves the runs for the host's own addresses and for the network
//! namespace the test creates (TEST-NET 198.18.0.0/15 addresses), which it removes again.

mod common;

use anyhow::{ensure, Context, Result};
use common::{msgs, pid_with_args, AgentSpec, Fleet, FleetOptions};
use serde_json::{json, Value};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where agents keep their runs' network namespaces by default (`/run/berth/netns/<node>`).
const NETNS_ROOT: &str = "/run/berth/netns";
/// host-local's store of the default bridge's network (`<ipam dir>/berth-<bridge>`).
const IPAM_STORE: &str = "/run/berth/cni-ipam/berth-berth0";

fn sh(cmd: &[&str]) -> Result<String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace standing for another host: joined to the root namespace by a veth pair
/// (`198.19.A.B+1` on the host side, `+2` inside), serving one file over HTTP with busybox
/// httpd. Removed on drop.
struct OutsideHost {
    name: String,
    host_veth: String,
    addr: Ipv4Addr,
    server: Option<Child>,
    _www: tempfile::TempDir,
}

impl OutsideHost {
    fn start(port: u16, body: &str) -> Result<OutsideHost> {
        // A /30 out of 198.19.0.0/16 chosen by the pid, so parallel test binaries differ.
        let n = (std::process::id() % 16_384) * 4;
        let base = Ipv4Addr::new(198, 19, (n / 256) as u8, (n % 256) as u8);
        OutsideHost::start_at("o", base, port, body)
    }

    /// Like `start`, on the /30 at `base`; `tag` (one letter) tells apart the hosts of one test
    /// binary.
    fn start_at(tag: &str, base: Ipv4Addr, port: u16, body: &str) -> Result<OutsideHost> {
        let pid = std::process::id();
        let name = format!("berth-e2e-{tag}ut-{pid}");
        let host_veth = format!("b{tag}{}h", pid % 1_000_000);
        let peer = format!("b{tag}{}p", pid % 1_000_000);
        let host_addr = Ipv4Addr::from(u32::from(base) + 1);
        let addr = Ipv4Addr::from(u32::from(base) + 2);
        let www = tempfile::tempdir()?;
        std::fs::write(www.path().join("index.html"), body)?;
        let mut outside = OutsideHost {
            name: name.clone(),
            host_veth: host_veth.clone(),
            addr,
            server: None,
            _www: www,
        };
        sh(&["ip", "netns", "add", &name])?;
        sh(&[
            "ip", "link", "add", &host_veth, "type", "veth", "peer", "name", &peer, "netns", &name,
        ])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_addr}/30"),
            "dev",
            &host_veth,
        ])?;
        sh(&["ip", "link", "set", &host_veth, "up"])?;
        let inside = |args: &[&str]| -> Result<String> {
            let mut cmd = vec!["ip", "netns", "exec", &name];
            cmd.extend_from_slice(args);
            sh(&cmd)
        };
        inside(&["ip", "addr", "add", &format!("{addr}/30"), "dev", &peer])?;
        inside(&["ip", "link", "set", &peer, "up"])?;
        inside(&["ip", "link", "set", "lo", "up"])?;
        let server = Command::new("ip")
            .args(["netns", "exec", &name, "busybox", "httpd", "-f", "-p"])
            .arg(format!("{addr}:{port}"))
            .arg("-h")
            .arg(outside._www.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        outside.server = Some(server);
        // Control: the server answers from the host before any run tries.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&SocketAddr::from((addr, port)), Duration::from_secs(1))
            .is_err()
        {
            ensure!(
                Instant::now() < deadline,
                "the outside server never answered"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(outside)
    }
}

impl Drop for OutsideHost {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The host's IPv4 addresses other than loopback, the runs' bridge and this test's veths.
fn host_addresses() -> Result<Vec<Ipv4Addr>> {
    let out = sh(&["ip", "-4", "-o", "addr", "show", "scope", "global"])?;
    let addrs: Vec<Ipv4Addr> = out
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let dev = *words.get(1)?;
            // The host ends of the outside hosts the tests of this file start (`b<tag><pid>h`,
            // any tag: the link-local test's comes and goes while this one runs).
            let test_veth = dev
                .strip_prefix('b')
                .and_then(|d| d.strip_suffix('h'))
                .and_then(|d| d.strip_prefix(|c: char| c.is_ascii_lowercase()))
                .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()));
            if dev == "berth0" || test_veth {
                return None;
            }
            let at = words.iter().position(|w| *w == "inet")?;
            words.get(at + 1)?.split('/').next()?.parse().ok()
        })
        .collect();
    ensure!(!addrs.is_empty(), "no global IPv4 address on this host");
    Ok(addrs)
}

/// The run's namespace file, its saved CNI configuration, and the host-local entries that name
/// it.
/// A fleet whose agents keep networks attached ahead, as deployed agents do (two each), so the
/// network tests cover runs that take one.
async fn start_warm(agents: &[AgentSpec]) -> Result<Fleet> {
    Fleet::start_opts(
        agents,
        FleetOptions {
            warm_networks: 2,
            ..Default::default()
        },
    )
    .await
}

struct RunNetworkTrace {
    netns: PathBuf,
    saved: PathBuf,
    /// The CNI container id of the run's network: the run's id, or the id of the network
    /// attached ahead of time that the run took (`network-slots/<run>` in the agent's state).
    run_id: String,
}

impl RunNetworkTrace {
    /// The run's network as it is now: build it while the run holds one (a network taken
    /// from the ready ones is known by its slot only until it is released).
    fn new(f: &Fleet, node: &str, run_id: &str) -> Self {
        let dir = Path::new(NETNS_ROOT).join(node);
        let slot =
            std::fs::read_to_string(f.agent_state_dir(node).join("network-slots").join(run_id))
                .ok()
                .map(|s| s.trim().to_owned());
        let id = slot.unwrap_or_else(|| run_id.to_owned());
        RunNetworkTrace {
            netns: dir.join(&id),
            saved: dir.join(format!("{id}.json")),
            run_id: id,
        }
    }

    fn mounted(&self) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let path = self.netns.display().to_string();
        info.lines()
            .any(|l| l.split_whitespace().nth(4) == Some(path.as_str()))
    }

    /// Addresses host-local has reserved for this run (files named by the address, holding
    /// the container id).
    fn reserved_addresses(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(IPAM_STORE) else {
            return vec![];
        };
        entries
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path())
                    .map(|c| c.lines().next() == Some(self.run_id.as_str()))
                    .unwrap_or(false)
            })
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }

    fn assert_held(&self) -> Result<()> {
        ensure!(self.netns.exists(), "{} exists", self.netns.display());
        ensure!(
            self.mounted(),
            "{} is a mounted namespace",
            self.netns.display()
        );
        ensure!(self.saved.exists(), "{} exists", self.saved.display());
        ensure!(
            self.reserved_addresses().len() == 1,
            "one address reserved for {}: {:?}",
            self.run_id,
            self.reserved_addresses()
        );
        Ok(())
    }

    /// Waits (up to 15 s) until nothing of the run's network is left.
    async fn wait_released(&self, f: &Fleet) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = self.netns.exists()
                || self.mounted()
                || self.saved.exists()
                || !self.reserved_addresses().is_empty();
            if !left {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "network of run {} not released: netns {} mounted {} saved {} addresses {:?}\n{}",
                self.run_id,
                self.netns.exists(),
                self.mounted(),
                self.saved.exists(),
                self.reserved_addresses(),
                f.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn finished_stdout(f: &Fleet, runner: &str, run: &str) -> Result<(Value, Vec<String>)> {
    let r = f.wait_finished(runner, run).await?;
    let logs = f.all_logs(runner, run).await?;
    Ok((r, msgs(&logs, "stdout")))
}

#[tokio::test]
async fn a_run_reaches_a_server_on_another_host() -> Result<()> {
    let token = format!("hello-from-outside-{}", std::process::id());
    let port = 8080;
    let outside = OutsideHost::start(port, &token)?;
    let f = start_warm(&[AgentSpec::new("fra")]).await?;
    let runner = f.runner("fra", json!({"timeout_seconds": 60})).await?;
    let url = format!("http://{}:{port}/index.html", outside.addr);
    let run = f
        .start_run(
            &runner,
            // (busybox's own wget -T crashes; timeout(1) bounds it instead)
            json!({"command": format!("cat /etc/resolv.conf; timeout 15 wget -q -O- {url}")}),
        )
        .await?;
    let (r, out) = finished_stdout(&f, &runner, &run).await?;
    ensure!(
        r["status"] == "succeeded" && out.contains(&token),
        "the run fetched {url}: {r}\n{out:?}\n{}",
        f.logs()
    );
    // The run's DNS configuration is the host's (its non-loopback nameservers).
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf")?;
    for ns in host_resolv
        .lines()
        .filter(|l| l.starts_with("nameserver") && !l.contains("127.") && !l.contains("::1"))
    {
        ensure!(out.iter().any(|l| l == ns.trim()), "{ns} in {out:?}");
    }
    Ok(())
}

/// Cloud metadata services live at link-local addresses (169.254.169.254) and hand out the
/// node's credentials: a run must not reach any link-local address, while the host can.
#[tokio::test]
async fn a_run_reaches_no_link_local_address() -> Result<()> {
    // A /30 in 169.254.0.0/16 away from 169.254.169.254 itself, so this never talks to a real
    // metadata service even on a machine with a route to one.
    let n = (std::process::id() % 64) * 4;
    let base = Ipv4Addr::new(169, 254, 77, n as u8);
    let token = format!("metadata-{}", std::process::id());
    let port = 8080;
    let metadata = OutsideHost::start_at("m", base, port, &token)?;
    let f = start_warm(&[AgentSpec::new("fra")]).await?;
    let runner = f.runner("fra", json!({"timeout_seconds": 60})).await?;
    let url = format!("http://{}:{port}/index.html", metadata.addr);
    let run = f
        .start_run(
            &runner,
            json!({"command": format!("if timeout 5 wget -q -O- {url}; then echo reached; else echo blocked; fi")}),
        )
        .await?;
    let (r, out) = finished_stdout(&f, &runner, &run).await?;
    ensure!(
        r["status"] == "succeeded" && out.iter().any(|l| l == "blocked") && !out.contains(&token),
        "a run fetched {url}: {r}\n{out:?}\n{}",
        f.logs()
    );
    Ok(())
}

/// Connects from a run to each `host/port` (`GATEWAY` stands for the run's default gateway) and
/// prints `reached host/port` or `blocked host/port`. nc exits once the server closes; one that
/// connected and waits is ended by `timeout` (exit status 124 and up) and counts as reached.
fn probe_script(targets: &[String]) -> String {
    format!(
        "gw=$(ip route | awk '/^default/ {{print $3}}'); echo gateway=$gw; \
         for t in {}; do t=$(echo $t | sed \"s/GATEWAY/$gw/\"); \
           timeout 20 nc -w 2 ${{t%/*}} ${{t##*/}} </dev/null >/dev/null 2>/tmp/err; rc=$?; \
           if [ $rc = 0 ] || [ $rc -ge 124 ]; then echo reached $t; \
           else echo blocked $t $(cat /tmp/err); fi; \
         done",
        targets.join(" ")
    )
}

/// The IPv6 link-local address of the runs' bridge and its interface index.
fn bridge_link_local() -> Result<(Ipv6Addr, u32)> {
    let out = sh(&[
        "ip", "-6", "-o", "addr", "show", "dev", "berth0", "scope", "link",
    ])?;
    let addr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no link-local address on berth0: {out}"))?;
    let index = std::fs::read_to_string("/sys/class/net/berth0/ifindex")?
        .trim()
        .parse()?;
    Ok((addr, index))
}

#[tokio::test]
async fn a_run_reaches_no_port_of_its_host() -> Result<()> {
    // Scheduler and API listen on every address, IPv4 and IPv6, so only the firewall keeps
    // runs away.
    let f = Fleet::start_opts(
        &[AgentSpec::new("fra")],
        FleetOptions {
            listen_host: Some("[::]".to_string()),
            // Beyond loopback the scheduler serves only over TLS.
            tls: true,
            warm_networks: 2,
            ..Default::default()
        },
    )
    .await?;
    // The agent dials out and listens on no port; a port of our own stands for any other
    // service of the host (registries and containerd listen on loopback or a unix socket).
    let other = TcpListener::bind("[::]:0")?;
    let ports = [
        ("scheduler", Fleet::port_of(&f.scheduler_addr)?),
        ("api", Fleet::port_of(&f.api_url)?),
        ("other", other.local_addr()?.port()),
    ];
    let runner = f.runner("fra", json!({"timeout_seconds": 90})).await?;
    // A first run makes sure the bridge exists, to learn its IPv6 link-local address.
    let first = f.start_run(&runner, json!({"command": "true"})).await?;
    f.wait_finished(&runner, &first).await?;
    let (link_local, bridge_index) = bridge_link_local()?;
    let hosts = host_addresses()?;
    let mut targets = vec![];
    for (_, port) in ports {
        targets.push(format!("GATEWAY/{port}"));
        targets.push(format!("{link_local}%eth0/{port}"));
        for h in &hosts {
            targets.push(format!("{h}/{port}"));
        }
    }
    let run = f
        .start_run(&runner, json!({"command": probe_script(&targets)}))
        .await?;
    let (r, out) = finished_stdout(&f, &runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}\n{out:?}\n{}", f.logs());
    let gateway: Ipv4Addr = out
        .iter()
        .find_map(|l| l.strip_prefix("gateway="))
        .and_then(|g| g.parse().ok())
        .with_context(|| format!("no gateway in {out:?}"))?;
    ensure!(
        out.iter().filter(|l| l.starts_with("blocked ")).count() == targets.len(),
        "every attempt from the run failed: {out:?}"
    );
    // Control: each of those ports answers from the host itself, at the same addresses.
    for (name, port) in ports {
        let mut addrs: Vec<SocketAddr> = std::iter::once(gateway)
            .chain(hosts.iter().copied())
            .map(|ip| SocketAddr::from((ip, port)))
            .collect();
        addrs.push(SocketAddr::V6(SocketAddrV6::new(
            link_local,
            port,
            0,
            bridge_index,
        )));
        for addr in addrs {
            TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .with_context(|| format!("{name} port at {addr} reachable from the host"))?;
        }
    }
    Ok(())
}

/// `CapEff` etc. of the default capability set: chown, dac_override, fowner, fsetid, kill,
/// setgid, setuid, setpcap, net_bind_service, net_raw, sys_chroot, mknod, audit_write, setfcap.
fn default_cap_mask() -> String {
    let bits = [0u32, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31];
    format!("{:016x}", bits.iter().fold(0u64, |m, b| m | (1 << b)))
}

#[tokio::test]
async fn a_run_is_confined_by_capabilities_seccomp_and_masked_paths() -> Result<()> {
    let f = start_warm(&[AgentSpec::new("fra")]).await?;
    let runner = f.runner("fra", json!({"timeout_seconds": 60})).await?;
    let script =
        "grep -E '^(Seccomp|NoNewPrivs|CapEff|CapPrm|CapBnd|CapInh|CapAmb):' /proc/self/status; \
        unshare -U true 2>/tmp/e; echo unshare-user=$? $(cat /tmp/e); \
        unshare -n true 2>/tmp/e; echo unshare-net=$? $(cat /tmp/e); \
        mkdir -p /mnt/t; mount -t tmpfs none /mnt/t 2>/tmp/e; echo mount=$? $(cat /tmp/e); \
        linux64 -R true 2>/tmp/e; echo no-aslr=$? $(cat /tmp/e); \
        linux32 -R true 2>/tmp/e; echo no-aslr-32=$? $(cat /tmp/e); \
        echo personality-32=$(linux32 cat /proc/self/personality 2>&1); \
        chroot / true 2>/tmp/e; echo chroot=$? $(cat /tmp/e); \
        echo keys-bytes=$(head -c 4096 /proc/keys 2>/dev/null | wc -c); \
        echo timer-list-bytes=$(head -c 4096 /proc/timer_list 2>/dev/null | wc -c); \
        echo firmware-entries=$(ls /sys/firmware | wc -l); \
        (echo x > /proc/sys/kernel/domainname) 2>/tmp/e; echo proc-sys=$? $(cat /tmp/e); \
        touch /sys/x 2>/tmp/e; echo sys=$? $(cat /tmp/e); \
        echo root-writes; echo ok > /tmp/w && cat /tmp/w";
    let run = f.start_run(&runner, json!({"command": script})).await?;
    let (r, out) = finished_stdout(&f, &runner, &run).await?;
    ensure!(r["status"] == "succeeded", "{r}\n{out:?}\n{}", f.logs());
    let field = |key: &str| -> Result<String> {
        out.iter()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("no {key} in {out:?}"))
    };
    let value = |key: &str| -> Result<String> {
        out.iter()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .with_context(|| format!("no {key} in {out:?}"))
    };
    // Under gVisor (`BERTH_TEST_ISOLATION=sandbox`) the same profile is enforced inside the
    // sandbox (runsc --oci-seccomp); the status file is gVisor's, without the NoNewPrivs and
    // CapAmb lines, and its netstack's raw sockets are off, so CAP_NET_RAW is not granted.
    let sandboxed = common::sandboxed();
    ensure!(field("Seccomp")? == "2", "a seccomp filter is on: {out:?}");
    if !sandboxed {
        ensure!(field("NoNewPrivs")? == "1", "{out:?}");
    }
    let mask = default_cap_mask();
    ensure!(mask == "00000000a80425fb", "the default set's mask");
    let granted = if sandboxed {
        "00000000a80405fb" // the default set less CAP_NET_RAW (bit 13)
    } else {
        mask.as_str()
    };
    for key in ["CapEff", "CapPrm", "CapBnd"] {
        ensure!(field(key)? == granted, "{key} is the default set: {out:?}");
    }
    let empty: &[&str] = if sandboxed {
        &["CapInh"]
    } else {
        &["CapInh", "CapAmb"]
    };
    for key in empty {
        ensure!(field(key)? == "0000000000000000", "{key} empty: {out:?}");
    }
    // A user namespace needs no capability: only the filter refuses it. Nor does turning off
    // address-space randomisation (`personality(ADDR_NO_RANDOMIZE)`, alone and with
    // `PER_LINUX32`): a denylist that lets `personality` through allows it, the allowlist's
    // argument rule does not.
    for key in [
        "unshare-user",
        "unshare-net",
        "mount",
        "no-aslr",
        "no-aslr-32",
    ] {
        let v = value(key)?;
        ensure!(
            !v.starts_with('0') && v.to_lowercase().contains("not permitted")
                || v.to_lowercase().contains("permission denied"),
            "{key} refused: {v}"
        );
    }
    // Controls: the filter is not just refusing everything near those calls. `personality`
    // still takes the values it allows, and `chroot` (allowed with the default capabilities,
    // which keep CAP_SYS_CHROOT) works.
    // gVisor has no 32-bit personality at all (EINVAL whatever the filter says).
    let personality = value("personality-32")?;
    ensure!(
        personality == "00000008" || sandboxed && personality.contains("Invalid argument"),
        "linux32 runs: {out:?}"
    );
    ensure!(value("chroot")? == "0", "chroot allowed: {out:?}");
    // Masked: what the host shows there (the controls), the run does not.
    let host_bytes = |p: &str| std::fs::read(p).map(|b| b.len()).unwrap_or(0);
    let host_entries = |p: &str| std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
    ensure!(host_bytes("/proc/keys") > 0 && host_bytes("/proc/timer_list") > 0);
    ensure!(host_entries("/sys/firmware") > 0);
    for key in ["keys-bytes", "timer-list-bytes", "firmware-entries"] {
        ensure!(value(key)? == "0", "{key} masked: {out:?}");
    }
    for key in ["proc-sys", "sys"] {
        let v = value(key)?;
        // gVisor's /proc/sys refuses the write itself (EPERM) rather than by a read-only mount.
        ensure!(
            !v.starts_with('0')
                && (v.contains("Read-only file system")
                    || sandboxed && v.contains("Operation not permitted")),
            "{key} read-only: {v}"
        );
    }
    ensure!(out.last().map(String::as_str) == Some("ok"), "{out:?}");
    Ok(())
}

#[tokio::test]
async fn two_runs_see_neither_each_others_processes_files_nor_ports() -> Result<()> {
    let f = start_warm(&[AgentSpec::new("fra")]).await?;
    let runner = f.runner("fra", json!({"timeout_seconds": 120})).await?;
    let marker = format!("a-secret-{}", std::process::id());
    // Run A: a file, a web server on port 7777, a sleep with a recognisable argument.
    let a = f
        .start_run(
            &runner,
            json!({"command": format!(
                "echo {marker} > /tmp/{marker}; mkdir /www; echo served-by-a > /www/index.html; \
                 httpd -p 7777 -h /www; \
                 echo address=$(ip -4 -o addr show dev eth0 | awk '{{print $4}}' | cut -d/ -f1); \
                 exec sleep 4711")}),
        )
        .await?;
    f.wait_for(&runner, &a, Duration::from_secs(30), |s| s == "running")
        .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let a_addr: Ipv4Addr = loop {
        let out = msgs(&f.all_logs(&runner, &a).await?, "stdout");
        if let Some(addr) = out.iter().find_map(|l| l.strip_prefix("address=")) {
            break addr.parse().with_context(|| format!("address {addr}"))?;
        }
        ensure!(
            Instant::now() < deadline,
            "run A printed no address: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Controls: A is running on the host, and its server answers the host. Under gVisor A's
    // processes are the sandbox kernel's tasks: the host has no process of that name at all.
    if common::sandboxed() {
        ensure!(
            pid_with_args(&["sleep", "4711"]).is_none(),
            "a sandboxed run's process is not a host process"
        );
    } else {
        ensure!(
            pid_with_args(&["sleep", "4711"]).is_some(),
            "A's process runs"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&SocketAddr::from((a_addr, 7777)), Duration::from_secs(2))
        .is_err()
    {
        ensure!(
            Instant::now() < deadline,
            "A's server at {a_addr}:7777 answers the host"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Run B looks for all of it.
    let b = f
        .start_run(
            &runner,
            json!({"command": format!(
                "ps -o pid,args; ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '; echo; \
                 ls /tmp; cat /tmp/{marker} 2>&1; \
                 timeout 5 wget -q -O- http://{a_addr}:7777/ 2>&1; echo wget=$?")}),
        )
        .await?;
    let (rb, out) = finished_stdout(&f, &runner, &b).await?;
    let all = out.join("\n");
    ensure!(rb["status"] == "succeeded", "{rb}\n{all}\n{}", f.logs());
    ensure!(!all.contains("4711"), "B sees A's process:\n{all}");
    ensure!(!all.contains("httpd"), "B sees A's server process:\n{all}");
    ensure!(
        all.contains(&format!("/tmp/{marker}': No such file")) && !out.contains(&marker),
        "B cannot read A's file:\n{all}"
    );
    ensure!(!all.contains("served-by-a"), "B reached A's server:\n{all}");
    ensure!(
        out.last().is_some_and(|l| l != "wget=0"),
        "B's request to A failed:\n{all}"
    );
    // B's process list holds only B's own few processes.
    let pids: Vec<&str> = out
        .iter()
        .find(|l| l.split_whitespace().all(|w| w.parse::<u32>().is_ok()) && !l.is_empty())
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    ensure!(
        !pids.is_empty() && pids.len() <= 5,
        "B sees only its own processes: {pids:?}\n{all}"
    );
    // `a` still runs and holds its network; it goes with the stop. (That every ending, `b`'s
    // included, releases the network is `every_ending_releases_the_runs_network`.)
    let node = f.node("fra").to_owned();
    let a_network = RunNetworkTrace::new(&f, &node, &a);
    a_network.assert_held()?;
    f.post(&format!("/v1/runners/{runner}/runs/{a}/stop"), json!({}))
        .await?;
    f.wait_finished(&runner, &a).await?;
    a_network.wait_released(&f).await?;
    Ok(())
}

#[tokio::test]
async fn every_ending_releases_the_runs_network() -> Result<()> {
    let f = start_warm(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let runner = f.runner("fra", json!({"timeout_seconds": 60})).await?;
    let short = f.runner("fra", json!({"timeout_seconds": 3})).await?;
    // Exit 0, exit 3, a timeout and a stop.
    let endings = [
        (&runner, "sleep 2; true"),
        (&runner, "sleep 2; exit 3"),
        (&short, "sleep 30"),
        (&runner, "sleep 30"),
    ];
    let mut runs = vec![];
    for (runner, command) in endings {
        runs.push((
            runner.clone(),
            f.start_run(runner, json!({ "command": command })).await?,
        ));
    }
    let mut traces = vec![];
    for (runner, run) in &runs {
        f.wait_for(runner, run, Duration::from_secs(30), |s| s != "pending")
            .await?;
        let trace = RunNetworkTrace::new(&f, &node, run);
        trace.assert_held().with_context(|| f.logs())?;
        traces.push(trace);
    }
    f.post(
        &format!("/v1/runners/{runner}/runs/{}/stop", runs[3].1),
        json!({}),
    )
    .await?;
    let expected = [
        ("succeeded", 0),
        ("failed", 3),
        ("failed", 124),
        ("canceled", 143),
    ];
    for (((runner, run), (status, code)), trace) in runs.iter().zip(expected).zip(&traces) {
        let r = f.wait_finished(runner, run).await?;
        ensure!(r["status"] == status, "{run}: {r}");
        if status != "canceled" {
            ensure!(r["exit_code"] == code, "{run}: {r}");
        }
        trace.wait_released(&f).await?;
    }
    Ok(())
}

/// Kills a run's task and deletes it and its container behind the agent's back (containerd's
/// API, the agent's namespace), as if they had vanished while no agent ran.
async fn remove_container(f: &Fleet, node: &str, id: &str) -> Result<()> {
    use containerd_client::services::v1::{
        containers_client::ContainersClient, tasks_client::TasksClient, DeleteContainerRequest,
        DeleteTaskRequest, KillRequest,
    };
    let channel = containerd_client::connect(&f.env.containerd_socket).await?;
    let ns = format!("berth-{node}");
    fn in_ns<T>(ns: &str, msg: T) -> Result<tonic::Request<T>> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("containerd-namespace", ns.parse()?);
        Ok(r)
    }
    let mut tasks = TasksClient::new(channel.clone());
    tasks
        .kill(in_ns(
            &ns,
            KillRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
                signal: 9,
                all: true,
            },
        )?)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(status) = tasks
        .delete(in_ns(
            &ns,
            DeleteTaskRequest {
                container_id: id.to_owned(),
            },
        )?)
        .await
    {
        ensure!(Instant::now() < deadline, "task {id} not deleted: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ContainersClient::new(channel)
        .delete(in_ns(&ns, DeleteContainerRequest { id: id.to_owned() })?)
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_restarted_agent_releases_the_networks_of_runs_it_took_over() -> Result<()> {
    let mut f = start_warm(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let runner = f.runner("fra", json!({"timeout_seconds": 60})).await?;
    let adopted = f
        .start_run(&runner, json!({"command": "sleep 4; echo done"}))
        .await?;
    let forgotten = f.start_run(&runner, json!({"command": "sleep 60"})).await?;
    let vanished = f.start_run(&runner, json!({"command": "sleep 60"})).await?;
    let mut traces = std::collections::HashMap::new();
    for run in [&adopted, &forgotten, &vanished] {
        f.wait_for(&runner, run, Duration::from_secs(30), |s| s == "running")
            .await?;
        let trace = RunNetworkTrace::new(&f, &node, run);
        trace.assert_held()?;
        traces.insert(run.clone(), trace);
    }
    f.signal_agent(&node, "KILL")?;
    // `forgotten` loses its journal: the next agent process finds its container and its
    // network but no record of the run. `vanished` loses its journal and its container: only
    // its network namespace and address are left.
    for run in [&forgotten, &vanished] {
        let journal = f.agent_state_dir(&node).join("runs").join(run);
        std::fs::remove_dir_all(&journal)
            .with_context(|| format!("removing {}", journal.display()))?;
    }
    remove_container(&f, &node, &vanished).await?;
    traces[&vanished].assert_held()?;
    f.restart_agent(&node)?;
    for run in [&forgotten, &vanished] {
        traces[run].wait_released(&f).await?;
    }
    let r = f.wait_finished(&runner, &adopted).await?;
    ensure!(
        r["status"] == "succeeded",
        "re-adopted run: {r}\n{}",
        f.logs()
    );
    traces[&adopted].wait_released(&f).await?;
    for run in [&forgotten, &vanished] {
        let r = f.wait_finished(&runner, run).await?;
        ensure!(r["status"] == "failed", "{run}: {r}");
    }
    Ok(())
}

#[tokio::test]
async fn runs_take_networks_attached_ahead_one_each_and_never_reused() -> Result<()> {
    let f = start_warm(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let slots = f.agent_state_dir(&node).join("network-slots");
    let dir = Path::new(NETNS_ROOT).join(&node);
    let ready = || -> Vec<String> {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with("warm-") && !n.ends_with(".json"))
                    .collect()
            })
            .unwrap_or_default()
    };
    // The agent attaches networks ahead once it has started.
    let deadline = Instant::now() + Duration::from_secs(15);
    while ready().len() < 2 {
        ensure!(Instant::now() < deadline, "networks ready: {:?}", ready());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let runner = f.runner("fra", json!({"timeout_seconds": 60})).await?;
    let mut used = vec![];
    for _ in 0..3 {
        let run = f
            .start_run(
                &runner,
                json!({"command": "ip -4 -o addr show eth0; sleep 2"}),
            )
            .await?;
        f.wait_for(&runner, &run, Duration::from_secs(30), |s| s == "running")
            .await?;
        let slot = std::fs::read_to_string(slots.join(&run))
            .with_context(|| format!("the run took no ready network\n{}", f.logs()))?;
        let trace = RunNetworkTrace::new(&f, &node, &run);
        trace.assert_held()?;
        let r = f.wait_finished(&runner, &run).await?;
        ensure!(r["status"] == "succeeded", "{r}");
        // Its network worked (an address on the bridge) and went with it.
        let out = msgs(&f.all_logs(&runner, &run).await?, "stdout");
        ensure!(out.iter().any(|l| l.contains("inet 10.")), "{out:?}");
        trace.wait_released(&f).await?;
        ensure!(!slots.join(&run).exists(), "the run's slot record goes too");
        used.push(slot.trim().to_owned());
    }
    let distinct: std::collections::BTreeSet<&String> = used.iter().collect();
    ensure!(
        distinct.len() == used.len(),
        "a network served two runs: {used:?}"
    );
    // And the agent keeps some ready for the next runs.
    let deadline = Instant::now() + Duration::from_secs(15);
    while ready().len() < 2 {
        ensure!(Instant::now() < deadline, "refilled: {:?}", ready());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        ready().iter().all(|s| !used.contains(s)),
        "a used network is offered again: {:?} vs {used:?}",
        ready()
    );
    Ok(())
}
