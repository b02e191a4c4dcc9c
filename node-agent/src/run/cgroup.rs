//! The agent's dealings with a run's cgroup, on either layout the kernel offers, through the
//! `cgroups-rs` crate: reading the OOM-kill counter (the only trace the kernel leaves of an OOM
//! kill once the task exited; it lives until the task is deleted), reading what a run uses
//! (memory, CPU time, processes) and removing its directories afterwards. runc removes the leaf
//! it created but not always on every path (and never the parents we chose), so the agent sweeps
//! them. Limits are not set here: they go into the OCI spec and runc applies them.
//!
//! - **v1** (and hybrid: v1 controllers plus an empty unified tree, this machine's layout): one
//!   directory per controller, `<root>/<controller>/<parent>/<run>`; OOM kills in the memory
//!   controller's `memory.oom_control` (`oom_kill N`, kernels ≥ 4.13).
//! - **v2** (unified, most current hosts): one directory, `<root>/<parent>/<run>`; OOM kills in
//!   `memory.events` (`oom_kill N`), a file the crate does not read, so the agent reads it at the
//!   memory controller's path the crate gives.
//!
//! [`Cgroups::detect`] tells the layouts apart at agent start (a layout with neither stops the
//! agent with a clear message). The crate's own hierarchies are bound to the host's mount table;
//! [`Tree`] is ours, a hierarchy rooted at any directory, so the same code runs on the real
//! `/sys/fs/cgroup` and on fake v1 and v2 trees in the unit tests.

use std::path::{Path, PathBuf};

use cgroups_rs::fs::blkio::BlkIoController;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::cpuset::CpuSetController;
use cgroups_rs::fs::devices::DevicesController;
use cgroups_rs::fs::freezer::FreezerController;
use cgroups_rs::fs::hugetlb::HugeTlbController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::net_cls::NetClsController;
use cgroups_rs::fs::net_prio::NetPrioController;
use cgroups_rs::fs::perf_event::PerfEventController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::rdma::RdmaController;
use cgroups_rs::fs::systemd::SystemdController;
use cgroups_rs::fs::{Cgroup, Controller, Hierarchy, Subsystem};

/// Where the cgroup hierarchies are mounted on a normal host (v1 controllers or the v2 tree).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The count of `key` in a flat-keyed cgroup file (`memory.events`: `oom 1`, `oom_kill 1`, …;
/// `memory.oom_control`: `oom_kill N`). None when the file has no such line.
pub fn flat_keyed_count(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, value) = line.split_once(char::is_whitespace)?;
        (k == key).then(|| value.trim().parse().ok())?
    })
}

/// The cgroup layout under a root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One hierarchy per controller (`memory/`, `pids/`, …), possibly beside an unused unified
    /// tree.
    V1 { hybrid: bool },
    /// The unified hierarchy (`cgroup.controllers` at the root).
    V2,
}

/// What the agent cannot run on.
#[derive(Debug, thiserror::Error)]
#[error(
    "unsupported cgroup layout under {root}: {why}; the agent needs cgroup v2 with the memory \
     controller, or cgroup v1 with a memory controller, mounted there"
)]
pub struct UnsupportedLayout {
    pub root: String,
    pub why: &'static str,
}

/// Which layout `root` holds.
pub fn detect(root: &Path) -> Result<Layout, UnsupportedLayout> {
    let unsupported = |why| UnsupportedLayout {
        root: root.display().to_string(),
        why,
    };
    if let Ok(controllers) = std::fs::read_to_string(root.join("cgroup.controllers")) {
        return if controllers.split_whitespace().any(|c| c == "memory") {
            Ok(Layout::V2)
        } else {
            Err(unsupported(
                "cgroup v2 without the memory controller (not in cgroup.controllers)",
            ))
        };
    }
    if root.join("memory").is_dir() {
        Ok(Layout::V1 {
            hybrid: root.join("unified/cgroup.controllers").is_file(),
        })
    } else {
        Err(unsupported(
            "neither cgroup v2 (no cgroup.controllers) nor cgroup v1 (no memory/)",
        ))
    }
}

/// What a run's cgroup shows it uses. Fields a kernel does not offer are 0 (`memory.peak`
/// arrived in Linux 5.19 on v2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunUsage {
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
    pub cpu_nanos: u64,
    pub processes: u64,
}

/// The host's cgroups: a root and the layout found there at start.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    layout: Layout,
}

impl Cgroups {
    /// The cgroups under `root`, or why the agent cannot run there.
    pub fn detect(root: &Path) -> Result<Self, UnsupportedLayout> {
        Ok(Self {
            root: root.to_path_buf(),
            layout: detect(root)?,
        })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The run's cgroup (whether or not it exists).
    fn run(&self, cgroup_parent: &str, run_id: &str) -> Cgroup {
        let tree = Tree {
            root: self.root.clone(),
            layout: self.layout,
        };
        Cgroup::load(Box::new(tree), run_path(cgroup_parent, run_id))
    }

    /// The OOM kills recorded for a run: on v2 the `oom_kill` (else `oom`) count of its
    /// `memory.events`; on v1 the `oom_kill` counter of its `memory.oom_control`. None when the
    /// cgroup is gone.
    pub fn oom_kills(&self, cgroup_parent: &str, run_id: &str) -> Option<u64> {
        let cgroup = self.run(cgroup_parent, run_id);
        let memory: &MemController = cgroup.controller_of()?;
        if !memory.exists() {
            return None;
        }
        if self.layout == Layout::V2 {
            let events = std::fs::read_to_string(memory.path().join("memory.events")).ok()?;
            return flat_keyed_count(&events, "oom_kill")
                .or_else(|| flat_keyed_count(&events, "oom"));
        }
        Some(memory.memory_stat().oom_control.oom_kill)
    }

    /// What the run uses now (memory, its peak, CPU time, processes). None when the cgroup is
    /// gone.
    pub fn usage(&self, cgroup_parent: &str, run_id: &str) -> Option<RunUsage> {
        let cgroup = self.run(cgroup_parent, run_id);
        let memory: &MemController = cgroup.controller_of()?;
        if !memory.exists() {
            return None;
        }
        let stat = memory.memory_stat();
        let cpu_nanos = if self.layout == Layout::V2 {
            cgroup
                .controller_of::<CpuController>()
                .and_then(|cpu| flat_keyed_count(&cpu.cpu().stat, "usage_usec"))
                .map_or(0, |usec| usec.saturating_mul(1_000))
        } else {
            cgroup
                .controller_of::<CpuAcctController>()
                .map_or(0, |acct| acct.cpuacct().usage)
        };
        let processes = cgroup
            .controller_of::<PidController>()
            .and_then(|pids| pids.get_pid_current().ok())
            .unwrap_or(0);
        Some(RunUsage {
            memory_bytes: stat.usage_in_bytes,
            memory_peak_bytes: stat.max_usage_in_bytes,
            cpu_nanos,
            processes,
        })
    }

    /// Removes the run's cgroup directories: every controller's on v1 (and the unified tree's on
    /// a hybrid host), the one directory on v2. Missing directories are fine; each failure is
    /// returned as a message. Blocking: the crate retries a busy directory for up to ~150 ms.
    pub fn remove(&self, cgroup_parent: &str, run_id: &str) -> Vec<String> {
        let mut failures = remove_all(&self.run(cgroup_parent, run_id));
        if self.layout == (Layout::V1 { hybrid: true }) {
            let unified = Tree {
                root: self.root.join("unified"),
                layout: Layout::V2,
            };
            let cgroup = Cgroup::load(Box::new(unified), run_path(cgroup_parent, run_id));
            failures.extend(remove_all(&cgroup));
        }
        failures
    }
}

fn run_path(cgroup_parent: &str, run_id: &str) -> PathBuf {
    Path::new(cgroup_parent.trim_matches('/')).join(run_id)
}

/// Deletes every controller's directory of `cgroup`, carrying on past a failure (the crate's
/// own `delete` stops at the first).
fn remove_all(cgroup: &Cgroup) -> Vec<String> {
    let mut failures = Vec::new();
    for subsystem in cgroup.subsystems() {
        let controller = subsystem.to_controller();
        match controller.delete() {
            Ok(()) => {}
            Err(e) => failures.push(format!("{}: {e}", controller.path().display())),
        }
    }
    failures
}

/// A hierarchy rooted at any directory (the crate's own read the host's mount table).
#[derive(Debug, Clone)]
struct Tree {
    root: PathBuf,
    layout: Layout,
}

/// The v1 controllers and how each is handled; a directory may hold several (`cpu,cpuacct`).
const V1_CONTROLLERS: [&str; 14] = [
    "blkio",
    "memory",
    "pids",
    "cpuset",
    "cpuacct",
    "cpu",
    "devices",
    "freezer",
    "net_cls",
    "perf_event",
    "net_prio",
    "hugetlb",
    "rdma",
    "systemd",
];

fn subsystem(name: &str, point: PathBuf, v2: bool) -> Option<Subsystem> {
    let base = PathBuf::new();
    Some(match name {
        "blkio" | "io" => Subsystem::BlkIo(BlkIoController::new(point, base, v2)),
        "memory" => Subsystem::Mem(MemController::new(point, base, v2)),
        "pids" => Subsystem::Pid(PidController::new(point, base, v2)),
        "cpuset" => Subsystem::CpuSet(CpuSetController::new(point, base, v2)),
        "cpuacct" => Subsystem::CpuAcct(CpuAcctController::new(point, base)),
        "cpu" => Subsystem::Cpu(CpuController::new(point, base, v2)),
        "devices" => Subsystem::Devices(DevicesController::new(point, base)),
        "freezer" => Subsystem::Freezer(FreezerController::new(point, base, v2)),
        "net_cls" => Subsystem::NetCls(NetClsController::new(point, base)),
        "perf_event" => Subsystem::PerfEvent(PerfEventController::new(point, base)),
        "net_prio" => Subsystem::NetPrio(NetPrioController::new(point, base)),
        "hugetlb" => Subsystem::HugeTlb(HugeTlbController::new(point, base, v2)),
        "rdma" => Subsystem::Rdma(RdmaController::new(point, base)),
        "systemd" => Subsystem::Systemd(SystemdController::new(point, base, v2)),
        _ => return None,
    })
}

impl Tree {
    /// Each v1 controller at its own directory, or at a combined one (`cpu,cpuacct`) when the
    /// host has no directory of that name.
    fn v1_points(&self) -> Vec<(&'static str, PathBuf)> {
        let combined: Vec<String> = std::fs::read_dir(&self.root)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| name.contains(','))
                    .collect()
            })
            .unwrap_or_default();
        V1_CONTROLLERS
            .iter()
            .filter_map(|&name| {
                let own = self.root.join(name);
                if own.is_dir() {
                    return Some((name, own));
                }
                combined
                    .iter()
                    .find(|dir| dir.split(',').any(|part| part == name))
                    .map(|dir| (name, self.root.join(dir)))
            })
            .collect()
    }
}

impl Hierarchy for Tree {
    fn subsystems(&self) -> Vec<Subsystem> {
        match self.layout {
            Layout::V1 { .. } => self
                .v1_points()
                .into_iter()
                .filter_map(|(name, point)| subsystem(name, point, false))
                .collect(),
            Layout::V2 => {
                let listed = std::fs::read_to_string(self.root.join("cgroup.controllers"))
                    .unwrap_or_default();
                // The freezer is core on v2, not a listed controller; it keeps the directory in
                // the list even when nothing else is (a hybrid host's empty unified tree).
                listed
                    .split_whitespace()
                    .filter(|name| !matches!(*name, "freezer" | "cpuacct" | "blkio"))
                    .chain(["freezer"])
                    .filter_map(|name| subsystem(name, self.root.clone(), true))
                    .collect()
            }
        }
    }

    fn root(&self) -> PathBuf {
        self.root.clone()
    }

    fn root_control_group(&self) -> Cgroup {
        Cgroup::load(Box::new(self.clone()), "")
    }

    fn parent_control_group(&self, path: &str) -> Cgroup {
        let parent = Path::new(path).parent().unwrap_or(Path::new(""));
        Cgroup::load(Box::new(self.clone()), parent)
    }

    fn v2(&self) -> bool {
        self.layout == Layout::V2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_counts_are_parsed() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(flat_keyed_count(text, "oom_kill"), Some(3));
        assert_eq!(
            flat_keyed_count("oom_kill_disable 0\nunder_oom 1\n", "oom_kill"),
            None
        );
        assert_eq!(flat_keyed_count("oom_kill x\n", "oom_kill"), None);
        assert_eq!(
            flat_keyed_count("usage_usec 1500\nuser_usec 1000\n", "usage_usec"),
            Some(1500)
        );
    }

    fn write(path: &Path, text: &str) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        std::fs::write(path, text).expect("write");
    }

    /// A fake v1 tree: a directory per controller, `cpu` and `cpuacct` combined (as on most
    /// hosts, where the two names are links to `cpu,cpuacct`; here without the links).
    fn v1_tree() -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        for controller in ["memory", "cpu,cpuacct", "pids", "devices", "systemd"] {
            std::fs::create_dir_all(root.path().join(controller)).expect("mkdir");
        }
        root
    }

    /// A fake v2 tree: `cgroup.controllers` at the root, one directory per run.
    fn v2_tree() -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        write(
            &root.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        );
        root
    }

    #[test]
    fn layouts_are_told_apart_and_an_unknown_one_is_refused_clearly() {
        let v2 = v2_tree();
        assert_eq!(detect(v2.path()).ok(), Some(Layout::V2));
        let v1 = v1_tree();
        assert_eq!(detect(v1.path()).ok(), Some(Layout::V1 { hybrid: false }));
        write(&v1.path().join("unified/cgroup.controllers"), "");
        assert_eq!(detect(v1.path()).ok(), Some(Layout::V1 { hybrid: true }));
        let neither = tempfile::tempdir().expect("tempdir");
        let e = detect(neither.path()).map(|_| ()).expect_err("unsupported");
        assert!(e.to_string().contains("unsupported cgroup layout"), "{e}");
        let no_memory = tempfile::tempdir().expect("tempdir");
        write(&no_memory.path().join("cgroup.controllers"), "cpu pids\n");
        let e = detect(no_memory.path()).map(|_| ()).expect_err("no memory");
        assert!(
            e.to_string().contains("without the memory controller"),
            "{e}"
        );
        // This machine: v1 (hybrid) at the real root.
        assert!(detect(Path::new(CGROUP_ROOT)).is_ok());
    }

    #[test]
    fn v1_oom_kills_and_usage_come_from_the_controllers() {
        let root = v1_tree();
        let cgroups = Cgroups::detect(root.path()).expect("v1");
        assert_eq!(cgroups.oom_kills("berth/n1", "r1"), None);
        assert_eq!(cgroups.usage("berth/n1", "r1"), None);
        let memory = root.path().join("memory/berth/n1/r1");
        write(
            &memory.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        write(&memory.join("memory.usage_in_bytes"), "4096\n");
        write(&memory.join("memory.max_usage_in_bytes"), "8192\n");
        write(
            &root.path().join("cpu,cpuacct/berth/n1/r1/cpuacct.usage"),
            "123456789\n",
        );
        write(&root.path().join("pids/berth/n1/r1/pids.current"), "3\n");
        assert_eq!(cgroups.oom_kills("/berth/n1/", "r1"), Some(2));
        assert_eq!(
            cgroups.usage("berth/n1", "r1"),
            Some(RunUsage {
                memory_bytes: 4096,
                memory_peak_bytes: 8192,
                cpu_nanos: 123_456_789,
                processes: 3,
            })
        );
        assert_eq!(cgroups.oom_kills("berth/n1", "r2"), None);
    }

    #[test]
    fn v2_oom_kills_and_usage_come_from_the_one_directory() {
        let root = v2_tree();
        let cgroups = Cgroups::detect(root.path()).expect("v2");
        let dir = root.path().join("berth/n1/r1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        assert_eq!(cgroups.oom_kills("berth/n1", "r1"), None);
        write(
            &dir.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n",
        );
        assert_eq!(cgroups.oom_kills("/berth/n1/", "r1"), Some(1));
        // Kernels before oom_kill was counted there: the oom events.
        write(&dir.join("memory.events"), "low 0\nhigh 0\nmax 4\noom 2\n");
        assert_eq!(cgroups.oom_kills("berth/n1", "r1"), Some(2));
        write(&dir.join("memory.current"), "1048576\n");
        write(
            &dir.join("cpu.stat"),
            "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n",
        );
        write(&dir.join("pids.current"), "7\n");
        assert_eq!(
            cgroups.usage("berth/n1", "r1"),
            Some(RunUsage {
                memory_bytes: 1_048_576,
                // No memory.peak (kernels before 5.19).
                memory_peak_bytes: 0,
                cpu_nanos: 2_500_000,
                processes: 7,
            })
        );
        write(&dir.join("memory.peak"), "2097152\n");
        assert_eq!(
            cgroups.usage("berth/n1", "r1").map(|u| u.memory_peak_bytes),
            Some(2_097_152)
        );
        // A v1-looking memory/ directory in a v2 tree is not consulted.
        std::fs::create_dir_all(root.path().join("memory/berth/n1/r2")).expect("mkdir");
        assert_eq!(cgroups.oom_kills("berth/n1", "r2"), None);
    }

    #[test]
    fn v2_removes_the_one_run_directory_and_keeps_the_parent() {
        let root = v2_tree();
        let cgroups = Cgroups::detect(root.path()).expect("v2");
        std::fs::create_dir_all(root.path().join("berth/n1/r1")).expect("mkdir");
        assert!(cgroups.remove("/berth/n1/", "r1").is_empty());
        assert!(!root.path().join("berth/n1/r1").exists());
        assert!(root.path().join("berth/n1").exists());
        assert!(cgroups.remove("berth/n1", "r1").is_empty());
    }

    #[test]
    fn v1_removes_run_dirs_under_every_controller_and_ignores_missing() {
        let root = v1_tree();
        write(&root.path().join("unified/cgroup.controllers"), "");
        let controllers = [
            "memory",
            "cpu,cpuacct",
            "pids",
            "devices",
            "systemd",
            "unified",
        ];
        for controller in controllers {
            std::fs::create_dir_all(root.path().join(controller).join("berth/n1/r1"))
                .expect("mkdir");
        }
        let cgroups = Cgroups::detect(root.path()).expect("hybrid");
        assert_eq!(cgroups.layout(), Layout::V1 { hybrid: true });
        let failures = cgroups.remove("/berth/n1/", "r1");
        assert!(failures.is_empty(), "{failures:?}");
        for controller in controllers {
            assert!(
                !root.path().join(controller).join("berth/n1/r1").exists(),
                "{controller}"
            );
            assert!(root.path().join(controller).join("berth/n1").exists());
        }
        assert!(cgroups.remove("berth/n1", "r1").is_empty());
    }

    #[test]
    fn a_directory_that_cannot_go_is_reported_and_the_others_still_go() {
        let root = v1_tree();
        for controller in ["memory", "pids"] {
            std::fs::create_dir_all(root.path().join(controller).join("berth/n1/r1"))
                .expect("mkdir");
        }
        // Child cgroups go first (the crate removes them), but a directory rmdir refuses stays:
        // on a real host a cgroup with processes left (EBUSY); in a fake tree, a plain file.
        std::fs::create_dir_all(root.path().join("pids/berth/n1/r1/child")).expect("mkdir");
        write(&root.path().join("memory/berth/n1/r1/cgroup.procs"), "42\n");
        let cgroups = Cgroups::detect(root.path()).expect("v1");
        let failures = cgroups.remove("berth/n1", "r1");
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("memory/berth/n1/r1"), "{failures:?}");
        assert!(!root.path().join("pids/berth/n1/r1").exists());
    }
}
