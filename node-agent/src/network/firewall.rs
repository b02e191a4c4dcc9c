//! Keeps runs away from the host: traffic arriving from the runs' bridge may not reach any local
//! address of the host (its gateway address, its public address, any port: scheduler, API,
//! registry, metadata of other daemons) unless it answers a connection the host opened; runs may
//! not reach each other across the bridge; and their traffic to other hosts is forwarded (even
//! when the host's FORWARD policy is DROP, as Docker sets it).
//!
//! Rules live in two chains of our own in the filter table, `BERTH-ISOLATION` (jumped to first
//! from INPUT) and `BERTH-FORWARD` (first from FORWARD). Every rule names its bridge and no two
//! rules of a bridge match the same packet, so their order does not matter: each is added when
//! `iptables -C` does not find it, which makes installing idempotent and safe for several
//! agents of a host doing it at the same moment. For IPv6 (runs get no IPv6 address, but
//! link-local addresses exist on the bridge) everything from the bridge is refused.
//!
//! Runs cannot reach each other only where bridged traffic passes iptables (`br_netfilter`,
//! `net.bridge.bridge-nf-call-iptables = 1`, which the agent sets when the module is there).

use std::collections::HashMap;
use std::process::Command;

use crate::network::error::NetworkError;

/// The chain INPUT jumps to.
pub const INPUT_CHAIN: &str = "BERTH-ISOLATION";
/// The chain FORWARD jumps to.
pub const FORWARD_CHAIN: &str = "BERTH-FORWARD";

/// One `iptables` rule: the chain it goes in and its match and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    pub spec: Vec<String>,
}

fn rule(chain: &'static str, spec: &[&str]) -> Rule {
    Rule {
        chain,
        spec: spec.iter().map(|s| s.to_string()).collect(),
    }
}

/// A rule refusing what `matches` selects, telling the sender (no silent drop, no hung probe).
fn reject(chain: &'static str, matches: &[&str]) -> Rule {
    let mut r = rule(chain, matches);
    r.spec
        .extend(["-j", "REJECT", "--reject-with", "icmp-admin-prohibited"].map(str::to_string));
    r
}

/// IPv4 link-local range, where clouds serve instance metadata and credentials.
pub const LINK_LOCAL_V4: &str = "169.254.0.0/16";

/// The IPv4 rules for `bridge`, in our chains.
pub fn ipv4_rules(bridge: &str) -> Vec<Rule> {
    vec![
        // To the host itself: only answers to what the host started.
        reject(
            INPUT_CHAIN,
            &[
                "-i",
                bridge,
                "-m",
                "conntrack",
                "!",
                "--ctstate",
                "ESTABLISHED,RELATED",
            ],
        ),
        // Run to run: refused.
        reject(FORWARD_CHAIN, &["-i", bridge, "-o", bridge]),
        // Link-local addresses (169.254.0.0/16) hold the cloud metadata service, which hands
        // out the node's credentials: never for runs.
        reject(FORWARD_CHAIN, &["-i", bridge, "-d", LINK_LOCAL_V4]),
        // Out to other hosts, and the answers back in.
        rule(
            FORWARD_CHAIN,
            &["-i", bridge, "!", "-o", bridge, "-j", "ACCEPT"],
        ),
        rule(
            FORWARD_CHAIN,
            &[
                "!",
                "-i",
                bridge,
                "-o",
                bridge,
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ],
        ),
    ]
}

/// The IPv6 rules: nothing from the bridge reaches the host or is forwarded.
pub fn ipv6_rules(bridge: &str) -> Vec<Rule> {
    vec![
        rule(INPUT_CHAIN, &["-i", bridge, "-j", "DROP"]),
        rule(FORWARD_CHAIN, &["-i", bridge, "-j", "DROP"]),
    ]
}

/// The jumps from the built-in chains into ours.
pub fn jumps() -> [(&'static str, &'static str); 2] {
    [("INPUT", INPUT_CHAIN), ("FORWARD", FORWARD_CHAIN)]
}

/// Runs `iptables`-style commands: returns whether the command succeeded, and its stderr.
pub trait IptablesRunner: Send + Sync {
    fn run(&self, binary: &str, args: &[String]) -> Result<(bool, String), NetworkError>;
}

/// The real `iptables`/`ip6tables` binaries.
pub struct ExecIptables;

impl IptablesRunner for ExecIptables {
    fn run(&self, binary: &str, args: &[String]) -> Result<(bool, String), NetworkError> {
        let output =
            Command::new(binary)
                .args(args)
                .output()
                .map_err(|e| NetworkError::Firewall {
                    command: binary.to_string(),
                    message: e.to_string(),
                })?;
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ))
    }
}

fn args(parts: &[&str], rest: &[String]) -> Vec<String> {
    // -w: wait for the xtables lock other agents (and CNI plugins) may hold.
    let mut v: Vec<String> = vec!["-w".to_string()];
    v.extend(parts.iter().map(|s| s.to_string()));
    v.extend(rest.iter().cloned());
    v
}

/// Creates the chains, the jumps and the rules that are missing, with `binary`.
pub fn install(
    runner: &dyn IptablesRunner,
    binary: &str,
    rules: &[Rule],
) -> Result<(), NetworkError> {
    let fail = |a: &[String], message: String| NetworkError::Firewall {
        command: format!("{binary} {}", a.join(" ")),
        message,
    };
    for (_, chain) in jumps() {
        let list = args(&["-S", chain], &[]);
        if !runner.run(binary, &list)?.0 {
            let create = args(&["-N", chain], &[]);
            let (ok, stderr) = runner.run(binary, &create)?;
            // Another agent may have created it in between.
            if !ok && !runner.run(binary, &list)?.0 {
                return Err(fail(&create, stderr));
            }
        }
    }
    for (builtin, chain) in jumps() {
        let target = vec!["-j".to_string(), chain.to_string()];
        if !runner.run(binary, &args(&["-C", builtin], &target))?.0 {
            let insert = args(&["-I", builtin, "1"], &target);
            let (ok, stderr) = runner.run(binary, &insert)?;
            if !ok {
                return Err(fail(&insert, stderr));
            }
        }
    }
    // A missing rule goes in at its place in its chain, not at the end: a node whose chains came
    // from an older agent gets a new refusal ahead of the accept that would shadow it.
    let mut position: HashMap<&str, usize> = HashMap::new();
    for rule in rules {
        let at = position.entry(rule.chain).or_insert(0);
        *at += 1;
        if !runner
            .run(binary, &args(&["-C", rule.chain], &rule.spec))?
            .0
        {
            let place = at.to_string();
            let insert = args(&["-I", rule.chain, &place], &rule.spec);
            let (ok, stderr) = runner.run(binary, &insert)?;
            if !ok {
                return Err(fail(&insert, stderr));
            }
        }
    }
    Ok(())
}

/// Where the kernel switches live (tests point it at a temp dir).
pub const PROC_SYS: &str = "/proc/sys";

/// Serialises installs of the agents of a host (iptables' own lock covers one command, not
/// our check-then-add pairs).
pub const LOCK_FILE: &str = "/run/berth/firewall.lock";

/// Makes the host a router for runs and installs the isolation rules for `bridge`, holding
/// `lock` (a file) meanwhile. IPv4 rules are required; IPv6 ones are installed when
/// `ip6tables` works (a warning otherwise).
pub fn isolate_bridge(
    runner: &dyn IptablesRunner,
    proc_sys: &std::path::Path,
    lock: &std::path::Path,
    bridge: &str,
) -> Result<(), NetworkError> {
    let lock_err = |e: std::io::Error| NetworkError::Firewall {
        command: format!("locking {}", lock.display()),
        message: e.to_string(),
    };
    if let Some(dir) = lock.parent() {
        std::fs::create_dir_all(dir).map_err(lock_err)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock)
        .map_err(lock_err)?;
    let _held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| lock_err(errno.into()))?;
    let forward = proc_sys.join("net/ipv4/ip_forward");
    std::fs::write(&forward, "1").map_err(|e| NetworkError::Firewall {
        command: format!("writing 1 to {}", forward.display()),
        message: e.to_string(),
    })?;
    let bridged = proc_sys.join("net/bridge/bridge-nf-call-iptables");
    if bridged.exists() {
        if let Err(error) = std::fs::write(&bridged, "1") {
            tracing::warn!(%error, "cannot enable bridge-nf-call-iptables: runs may reach each other");
        }
    } else {
        tracing::warn!("br_netfilter is not loaded: runs on the bridge may reach each other (the host stays closed to them)");
    }
    install(runner, "iptables", &ipv4_rules(bridge))?;
    if let Err(error) = install(runner, "ip6tables", &ipv6_rules(bridge)) {
        tracing::warn!(%error, "IPv6 isolation rules not installed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// A fake iptables: chains of rule strings.
    #[derive(Default)]
    struct FakeIptables {
        chains: Mutex<HashMap<String, Vec<String>>>,
        log: Mutex<Vec<String>>,
    }

    impl FakeIptables {
        fn with_builtins() -> Self {
            let fake = FakeIptables::default();
            for c in ["INPUT", "FORWARD"] {
                fake.chains
                    .lock()
                    .expect("lock")
                    .insert(c.to_string(), vec![]);
            }
            fake
        }
        fn chain(&self, name: &str) -> Vec<String> {
            self.chains.lock().expect("lock")[name].clone()
        }
    }

    impl IptablesRunner for FakeIptables {
        fn run(&self, _binary: &str, args: &[String]) -> Result<(bool, String), NetworkError> {
            assert_eq!(args[0], "-w");
            self.log.lock().expect("lock").push(args.join(" "));
            let mut chains = self.chains.lock().expect("lock");
            let op = args[1].as_str();
            let chain = args[2].clone();
            let spec = |from: usize| args[from..].join(" ");
            Ok(match op {
                "-S" => (chains.contains_key(&chain), String::new()),
                "-N" => (chains.insert(chain, vec![]).is_none(), String::new()),
                "-C" => (
                    chains.get(&chain).is_some_and(|c| c.contains(&spec(3))),
                    String::new(),
                ),
                "-A" => match chains.get_mut(&chain) {
                    Some(c) => {
                        c.push(spec(3));
                        (true, String::new())
                    }
                    None => (false, "no chain".to_string()),
                },
                "-I" => match chains.get_mut(&chain) {
                    Some(c) => {
                        let at = args[3].parse::<usize>().expect("position") - 1;
                        c.insert(at.min(c.len()), spec(4));
                        (true, String::new())
                    }
                    None => (false, "no chain".to_string()),
                },
                other => panic!("unexpected {other}"),
            })
        }
    }

    #[test]
    fn installs_chains_jumps_and_rules_once() {
        let fake = FakeIptables::with_builtins();
        fake.chains
            .lock()
            .expect("lock")
            .get_mut("INPUT")
            .expect("input")
            .push("-i eth0 -j ACCEPT".to_string());
        install(&fake, "iptables", &ipv4_rules("berth0")).expect("install");
        install(&fake, "iptables", &ipv4_rules("berth0")).expect("again");
        assert_eq!(
            fake.chain("INPUT"),
            vec!["-j BERTH-ISOLATION", "-i eth0 -j ACCEPT"],
            "our jump comes first"
        );
        assert_eq!(fake.chain("FORWARD"), vec!["-j BERTH-FORWARD"]);
        assert_eq!(
            fake.chain(INPUT_CHAIN),
            vec!["-i berth0 -m conntrack ! --ctstate ESTABLISHED,RELATED -j REJECT --reject-with icmp-admin-prohibited"]
        );
        assert_eq!(fake.chain(FORWARD_CHAIN).len(), 4);
        // A second bridge adds its own rules beside the first one's.
        install(&fake, "iptables", &ipv4_rules("berth1")).expect("second bridge");
        assert_eq!(fake.chain(INPUT_CHAIN).len(), 2);
        assert_eq!(fake.chain("INPUT").len(), 2);
    }

    #[test]
    fn a_rule_missing_from_older_chains_goes_in_at_its_place() {
        let fake = FakeIptables::with_builtins();
        let all = ipv4_rules("berth0");
        // Chains as an agent without the link-local refusal left them.
        let older: Vec<Rule> = all
            .iter()
            .filter(|r| !r.spec.iter().any(|p| p == LINK_LOCAL_V4))
            .cloned()
            .collect();
        install(&fake, "iptables", &older).expect("older");
        install(&fake, "iptables", &all).expect("upgrade");
        let want: Vec<String> = all
            .iter()
            .filter(|r| r.chain == FORWARD_CHAIN)
            .map(|r| r.spec.join(" "))
            .collect();
        assert_eq!(fake.chain(FORWARD_CHAIN), want);
    }

    #[test]
    fn every_rule_names_the_bridge_and_forward_rules_are_disjoint() {
        for r in ipv4_rules("br-x").iter().chain(ipv6_rules("br-x").iter()) {
            assert!(r
                .spec
                .windows(2)
                .any(|w| (w[0] == "-i" || w[0] == "-o") && w[1] == "br-x"));
        }
        let forward: Vec<String> = ipv4_rules("b")
            .into_iter()
            .filter(|r| r.chain == FORWARD_CHAIN)
            .map(|r| r.spec.join(" "))
            .collect();
        // run → run refused; run → elsewhere accepted; elsewhere → run only as answers.
        assert!(forward.iter().any(|r| r.starts_with("-i b -o b -j REJECT")));
        assert!(forward.iter().any(|r| r == "-i b ! -o b -j ACCEPT"));
        // The link-local refusal comes before the general accept, or it would never match.
        let link_local = forward
            .iter()
            .position(|r| r.starts_with("-i b -d 169.254.0.0/16 -j REJECT"));
        let accept = forward.iter().position(|r| r == "-i b ! -o b -j ACCEPT");
        assert!(matches!((link_local, accept), (Some(l), Some(a)) if l < a));
        assert!(forward
            .iter()
            .any(|r| r.starts_with("! -i b -o b -m conntrack --ctstate ESTABLISHED,RELATED")));
    }

    #[test]
    fn isolate_bridge_turns_on_forwarding() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("net/ipv4")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("net/bridge")).expect("mkdir");
        std::fs::write(dir.path().join("net/ipv4/ip_forward"), "0").expect("write");
        std::fs::write(dir.path().join("net/bridge/bridge-nf-call-iptables"), "0").expect("w");
        let fake = FakeIptables::with_builtins();
        let lock = dir.path().join("run/firewall.lock");
        isolate_bridge(&fake, dir.path(), &lock, "berth0").expect("isolate");
        assert!(lock.exists());
        let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).expect("read");
        assert_eq!(read("net/ipv4/ip_forward"), "1");
        assert_eq!(read("net/bridge/bridge-nf-call-iptables"), "1");
        assert_eq!(
            fake.chain(INPUT_CHAIN).len(),
            2,
            "IPv4 and IPv6 rule (one fake)"
        );
    }
}
