//! The agent's direct dealings with a run's cgroup v1 directories: reading the memory
//! controller's OOM-kill counter (the only trace the kernel leaves of an OOM kill once the task
//! exited; it lives until the task is deleted) and removing the directories afterwards. runc
//! removes the leaf it created but not always on every path (and never the parents we chose), so
//! the agent sweeps every mounted v1 controller.

use std::io;
use std::path::Path;

/// Where cgroup v1 controllers are mounted on a normal host.
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

/// The OOM kills recorded in `<root>/memory/<cgroup_parent>/<run_id>`: the `oom_kill` counter
/// of `memory.oom_control`, or, on kernels without it, `memory.failcnt` (how often usage hit the
/// limit: a strong hint, not proof). None when the cgroup is gone or unreadable.
pub fn read_oom_kills(root: &Path, cgroup_parent: &str, run_id: &str) -> Option<u64> {
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
