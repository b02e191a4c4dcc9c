//! The agent's direct dealings with a run's cgroup directories, on either layout the kernel
//! offers: reading the OOM-kill counter (the only trace the kernel leaves of an OOM kill once the
//! task exited; it lives until the task is deleted) and removing the directories afterwards.
//! runc removes the leaf it created but not always on every path (and never the parents we
//! chose), so the agent sweeps them.
//!
//! - **v1** (and hybrid: v1 controllers plus an empty unified tree, this machine's layout): one
//!   directory per controller, `<root>/<controller>/<parent>/<run>`; OOM kills in the memory
//!   controller's `memory.oom_control` (`oom_kill N`).
//! - **v2** (unified, most current hosts): one directory, `<root>/<parent>/<run>`; OOM kills in
//!   `memory.events` (`oom_kill N`).
//!
//! [`detect`] tells them apart at agent start (a layout with neither stops the agent with a clear
//! message); the readers look at the tree they are given each time (one `stat`), so tests run
//! them on fake v1 and v2 trees.

use std::io;
use std::path::Path;

/// Where the cgroup hierarchies are mounted on a normal host (v1 controllers or the v2 tree).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How many processes of the cgroup the OOM killer ended, from the text of a cgroup v1
/// `memory.oom_control` (`oom_kill_disable 0`, `under_oom 0`, `oom_kill N`). None when the file
/// has no `oom_kill` line (kernels before 4.13).
pub fn parse_oom_kill_count(oom_control: &str) -> Option<u64> {
    oom_control.lines().find_map(|line| {
        let (key, value) = line.split_once(char::is_whitespace)?;
        (key == "oom_kill").then(|| value.trim().parse().ok())?
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
    "unsupported cgroup layout under {0}: neither cgroup v2 (no cgroup.controllers) nor cgroup v1 \
     with a memory controller (no memory/); the agent needs one of them mounted there"
)]
pub struct UnsupportedLayout(pub String);

/// Which layout `root` holds.
pub fn detect(root: &Path) -> Result<Layout, UnsupportedLayout> {
    if root.join("cgroup.controllers").is_file() {
        Ok(Layout::V2)
    } else if root.join("memory").is_dir() {
        Ok(Layout::V1 {
            hybrid: root.join("unified/cgroup.controllers").is_file(),
        })
    } else {
        Err(UnsupportedLayout(root.display().to_string()))
    }
}

fn run_dir_v2(root: &Path, cgroup_parent: &str, run_id: &str) -> std::path::PathBuf {
    root.join(cgroup_parent.trim_matches('/')).join(run_id)
}

/// The OOM kills recorded for a run: on v2 the `oom_kill` (else `oom`) count of the run's
/// `memory.events`; on v1 the `oom_kill` counter of `<root>/memory/<parent>/<run>/
/// memory.oom_control`, or, on kernels without it, `memory.failcnt` (how often usage hit the
/// limit: a strong hint, not proof). None when the cgroup is gone or unreadable.
pub fn read_oom_kills(root: &Path, cgroup_parent: &str, run_id: &str) -> Option<u64> {
    if detect(root).ok()? == Layout::V2 {
        let events =
            std::fs::read_to_string(run_dir_v2(root, cgroup_parent, run_id).join("memory.events"))
                .ok()?;
        return parse_oom_kill_count(&events).or_else(|| {
            events.lines().find_map(|line| {
                let (key, value) = line.split_once(char::is_whitespace)?;
                (key == "oom").then(|| value.trim().parse().ok())?
            })
        });
    }
    let dir = root
        .join("memory")
        .join(cgroup_parent.trim_matches('/'))
        .join(run_id);
    let oom_control = std::fs::read_to_string(dir.join("memory.oom_control")).ok()?;
    if let Some(kills) = parse_oom_kill_count(&oom_control) {
        return Some(kills);
    }
    std::fs::read_to_string(dir.join("memory.failcnt"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Removes `<root>/<controller>/<cgroup_parent>/<run_id>` for every controller directory under
/// `root`. Missing directories are fine; other failures are returned as (path, error) pairs.
pub fn remove_run_cgroups(
    root: &Path,
    cgroup_parent: &str,
    run_id: &str,
) -> Vec<(String, io::Error)> {
    let mut failures = Vec::new();
    if matches!(detect(root), Ok(Layout::V2)) {
        let dir = run_dir_v2(root, cgroup_parent, run_id);
        match std::fs::remove_dir(&dir) {
            Ok(()) => tracing::debug!(path = %dir.display(), "removed cgroup"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => failures.push((dir.display().to_string(), e)),
        }
        return failures;
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return failures;
    };
    let relative = Path::new(cgroup_parent.trim_matches('/')).join(run_id);
    for entry in entries.flatten() {
        let dir = entry.path().join(&relative);
        match std::fs::remove_dir(&dir) {
            Ok(()) => tracing::debug!(path = %dir.display(), "removed cgroup"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // The symlinked aliases (cpu -> cpu,cpuacct) see the same directory twice, and a
            // non-directory entry (e.g. a stray file) is not a controller.
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOTDIR as i32) => {}
            Err(e) => failures.push((dir.display().to_string(), e)),
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_counter_is_parsed() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_oom_kill_count(text), Some(3));
        assert_eq!(
            parse_oom_kill_count("oom_kill_disable 0\nunder_oom 1\n"),
            None
        );
        assert_eq!(parse_oom_kill_count("oom_kill x\n"), None);
    }

    #[test]
    fn oom_kills_are_read_from_the_memory_controller_with_a_failcnt_fallback() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("memory/berth/n1/r1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        assert_eq!(read_oom_kills(root.path(), "berth/n1", "r1"), None);
        std::fs::write(
            dir.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\n",
        )
        .expect("write");
        std::fs::write(dir.join("memory.failcnt"), "12\n").expect("write");
        assert_eq!(read_oom_kills(root.path(), "/berth/n1/", "r1"), Some(12));
        std::fs::write(
            dir.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        )
        .expect("write");
        assert_eq!(read_oom_kills(root.path(), "berth/n1", "r1"), Some(0));
        assert_eq!(read_oom_kills(root.path(), "berth/n1", "r2"), None);
    }

    /// A fake v2 tree: `cgroup.controllers` at the root, one directory per run.
    fn v2_tree() -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpu io memory pids\n",
        )
        .expect("write");
        root
    }

    #[test]
    fn layouts_are_told_apart_and_an_unknown_one_is_refused_clearly() {
        let v2 = v2_tree();
        assert_eq!(detect(v2.path()).ok(), Some(Layout::V2));
        let v1 = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(v1.path().join("memory")).expect("mkdir");
        assert_eq!(detect(v1.path()).ok(), Some(Layout::V1 { hybrid: false }));
        std::fs::create_dir_all(v1.path().join("unified")).expect("mkdir");
        std::fs::write(v1.path().join("unified/cgroup.controllers"), "").expect("write");
        assert_eq!(detect(v1.path()).ok(), Some(Layout::V1 { hybrid: true }));
        let neither = tempfile::tempdir().expect("tempdir");
        let e = detect(neither.path()).map(|_| ()).expect_err("unsupported");
        assert!(e.to_string().contains("unsupported cgroup layout"), "{e}");
        // This machine: v1 (hybrid) at the real root.
        assert!(detect(Path::new(CGROUP_ROOT)).is_ok());
    }

    #[test]
    fn v2_oom_kills_come_from_memory_events() {
        let root = v2_tree();
        let dir = root.path().join("berth/n1/r1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        assert_eq!(read_oom_kills(root.path(), "berth/n1", "r1"), None);
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .expect("write");
        assert_eq!(read_oom_kills(root.path(), "/berth/n1/", "r1"), Some(1));
        // Kernels before oom_kill was counted there: the oom events.
        std::fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 4\noom 2\n").expect("write");
        assert_eq!(read_oom_kills(root.path(), "berth/n1", "r1"), Some(2));
        // A v1-looking memory/ directory in a v2 tree is not consulted.
        assert_eq!(read_oom_kills(root.path(), "berth/n1", "r2"), None);
    }

    #[test]
    fn v2_removes_the_one_run_directory_and_keeps_the_parent() {
        let root = v2_tree();
        std::fs::create_dir_all(root.path().join("berth/n1/r1")).expect("mkdir");
        assert!(remove_run_cgroups(root.path(), "/berth/n1/", "r1").is_empty());
        assert!(!root.path().join("berth/n1/r1").exists());
        assert!(root.path().join("berth/n1").exists());
        assert!(remove_run_cgroups(root.path(), "berth/n1", "r1").is_empty());
    }

    #[test]
    fn removes_run_dirs_under_every_controller_and_ignores_missing() {
        let root = tempfile::tempdir().expect("tempdir");
        for controller in ["memory", "cpu,cpuacct", "pids"] {
            std::fs::create_dir_all(root.path().join(controller).join("berth/n1/r1"))
                .expect("mkdir");
        }
        std::fs::create_dir_all(root.path().join("devices")).expect("mkdir");
        let failures = remove_run_cgroups(root.path(), "/berth/n1/", "r1");
        assert!(failures.is_empty(), "{failures:?}");
        for controller in ["memory", "cpu,cpuacct", "pids"] {
            assert!(!root.path().join(controller).join("berth/n1/r1").exists());
            assert!(root.path().join(controller).join("berth/n1").exists());
        }
        assert!(remove_run_cgroups(root.path(), "berth/n1", "r1").is_empty());
    }
}
