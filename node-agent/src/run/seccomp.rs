//! The default seccomp profile every run gets, written for Berth: everything is allowed except
//! the system calls a batch workload has no business making, which fail with `EPERM` (so a
//! program sees an ordinary permission error, not a kill). Most of them are also refused by the
//! missing capabilities; the filter is the second wall, and it covers what capabilities do not
//! (creating user namespaces, `userfaultfd`, `io_uring`, `bpf` where unprivileged use is on).
//!
//! - kernel and machine: modules, kexec, reboot, swap, clock setting, `acct`, `syslog`,
//!   `iopl`/`ioperm`, quotas, `lookup_dcookie`, obsolete calls;
//! - kernel attack surface: `bpf`, `perf_event_open`, `userfaultfd`, the kernel keyring,
//!   `io_uring`;
//! - escaping the container: `mount`/`umount2`/`pivot_root` and the new mount API,
//!   `unshare`/`setns`, `clone` with any namespace flag, `open_by_handle_at`;
//! - reaching into other processes: `ptrace`, `process_vm_readv`/`writev`;
//! - `clone3` fails with `ENOSYS`: a filter cannot look into its flags (they sit in memory), and
//!   `ENOSYS` makes the C library fall back to `clone`, whose flags the filter does check.

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompOperator,
    LinuxSyscall,
};
use oci_spec::OciSpecError;

/// `EPERM`: what a refused call returns.
pub const EPERM: u32 = 1;
/// `ENOSYS`: what `clone3` returns, so callers fall back to `clone`.
pub const ENOSYS: u32 = 38;

/// System calls refused outright with `EPERM`.
pub const DENIED_SYSCALLS: &[&str] = &[
    // kernel modules, kexec, power
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "query_module",
    "get_kernel_syms",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    // kernel attack surface
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // mounts and namespaces
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "unshare",
    "setns",
    "open_by_handle_at",
    // other processes
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    // the machine's state
    "swapon",
    "swapoff",
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "adjtimex",
    "clock_adjtime",
    "clock_adjtime64",
    "acct",
    "syslog",
    "iopl",
    "ioperm",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
    "nfsservctl",
    "uselib",
    "vm86",
    "vm86old",
    "_sysctl",
];

/// The `CLONE_NEW*` flags `clone` may not carry (user, mount, pid, net, ipc, uts, cgroup).
pub const CLONE_NAMESPACE_FLAGS: &[u64] = &[
    0x1000_0000, // CLONE_NEWUSER
    0x0002_0000, // CLONE_NEWNS
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
    0x0800_0000, // CLONE_NEWIPC
    0x0400_0000, // CLONE_NEWUTS
    0x0200_0000, // CLONE_NEWCGROUP
];

/// The architectures the filter names system calls for: the native one and its compat ABIs,
/// so a 32-bit call cannot slip past a rule written for its 64-bit twin.
fn architectures() -> Vec<Arch> {
    if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]
    } else {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    }
}

fn rule(names: &[&str], action: LinuxSeccompAction, errno: u32) -> LinuxSyscall {
    let mut syscall = LinuxSyscall::default();
    syscall.set_names(names.iter().map(|n| n.to_string()).collect());
    syscall.set_action(action);
    syscall.set_errno_ret(Some(errno));
    syscall
}

/// The profile: default allow, the rules above.
pub fn default_profile() -> Result<LinuxSeccomp, OciSpecError> {
    let mut syscalls = vec![rule(
        DENIED_SYSCALLS,
        LinuxSeccompAction::ScmpActErrno,
        EPERM,
    )];
    // One rule per flag: the arguments of one rule are ANDed, separate rules ORed, so `clone`
    // is refused when any one of the flags is set. `value` is the mask, `valueTwo` the datum.
    for flag in CLONE_NAMESPACE_FLAGS {
        let arg = LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(*flag)
            .value_two(*flag)
            .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
            .build()?;
        let mut clone = rule(&["clone"], LinuxSeccompAction::ScmpActErrno, EPERM);
        clone.set_args(Some(vec![arg]));
        syscalls.push(clone);
    }
    syscalls.push(rule(&["clone3"], LinuxSeccompAction::ScmpActErrno, ENOSYS));

    let mut seccomp = LinuxSeccomp::default();
    seccomp.set_default_action(LinuxSeccompAction::ScmpActAllow);
    seccomp.set_architectures(Some(architectures()));
    seccomp.set_syscalls(Some(syscalls));
    Ok(seccomp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn profile_json() -> Value {
        serde_json::to_value(default_profile().expect("profile")).expect("serializes")
    }

    fn rules_for(json: &Value, name: &str) -> Vec<Value> {
        json["syscalls"]
            .as_array()
            .expect("syscalls")
            .iter()
            .filter(|r| {
                r["names"]
                    .as_array()
                    .is_some_and(|n| n.contains(&name.into()))
            })
            .cloned()
            .collect()
    }

    #[test]
    fn default_allows_and_names_the_compat_architectures() {
        let json = profile_json();
        assert_eq!(json["defaultAction"], "SCMP_ACT_ALLOW");
        let arches = json["architectures"].as_array().expect("architectures");
        assert!(arches.len() >= 2, "native and compat: {arches:?}");
        if cfg!(target_arch = "x86_64") {
            assert!(arches.contains(&"SCMP_ARCH_X86_64".into()));
            assert!(arches.contains(&"SCMP_ARCH_X86".into()));
        }
    }

    #[test]
    fn dangerous_calls_fail_with_eperm() {
        let json = profile_json();
        for name in [
            "kexec_load",
            "init_module",
            "finit_module",
            "delete_module",
            "bpf",
            "perf_event_open",
            "keyctl",
            "add_key",
            "request_key",
            "mount",
            "umount2",
            "pivot_root",
            "unshare",
            "setns",
            "userfaultfd",
            "swapon",
            "swapoff",
            "reboot",
            "settimeofday",
            "clock_settime",
            "adjtimex",
            "acct",
            "open_by_handle_at",
            "iopl",
            "ioperm",
            "quotactl",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
            "lookup_dcookie",
            "syslog",
            "fsopen",
            "fsmount",
            "move_mount",
            "open_tree",
            "fspick",
        ] {
            let rules = rules_for(&json, name);
            assert_eq!(rules.len(), 1, "{name} has one rule");
            assert_eq!(rules[0]["action"], "SCMP_ACT_ERRNO", "{name}");
            assert_eq!(rules[0]["errnoRet"], EPERM, "{name}");
            assert!(
                rules[0].get("args").is_none(),
                "{name} is refused whatever its arguments"
            );
        }
        for allowed in ["read", "write", "execve", "clone", "chroot", "personality"] {
            assert!(
                !DENIED_SYSCALLS.contains(&allowed),
                "{allowed} must stay allowed"
            );
        }
    }

    #[test]
    fn clone_is_refused_with_any_namespace_flag_and_clone3_falls_back() {
        let json = profile_json();
        let clone = rules_for(&json, "clone");
        assert_eq!(clone.len(), CLONE_NAMESPACE_FLAGS.len());
        let mut flags = Vec::new();
        for r in &clone {
            assert_eq!(r["action"], "SCMP_ACT_ERRNO");
            assert_eq!(r["errnoRet"], EPERM);
            let args = r["args"].as_array().expect("args");
            assert_eq!(args.len(), 1, "one condition per rule (ORed across rules)");
            assert_eq!(args[0]["index"], 0);
            assert_eq!(args[0]["op"], "SCMP_CMP_MASKED_EQ");
            assert_eq!(
                args[0]["value"], args[0]["valueTwo"],
                "flag set ⇔ masked value equals it"
            );
            flags.push(args[0]["value"].as_u64().expect("u64"));
        }
        let mask: u64 = flags.iter().fold(0, |m, f| m | f);
        // Every CLONE_NEW* flag clone(2) accepts, and nothing else (CLONE_THREAD etc. stay).
        assert_eq!(mask, 0x7E02_0000);
        let clone3 = rules_for(&json, "clone3");
        assert_eq!(clone3.len(), 1);
        assert_eq!(clone3[0]["errnoRet"], ENOSYS);
    }
}
