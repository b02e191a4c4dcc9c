//! Removes a run's cgroup directories. runc removes the leaf it created but not always on every
//! path (and never the parents we chose), so the agent sweeps every mounted v1 controller.

use std::io;
use std::path::Path;

/// Where cgroup v1 controllers are mounted on a normal host.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

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
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {}
            Err(e) => failures.push((dir.display().to_string(), e)),
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

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
