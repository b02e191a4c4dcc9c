//! The default seccomp profile every run gets, written for Berth as an allowlist: a run may make
//! the system calls ordinary programs are built from (processes and threads, signals, memory,
//! files and paths, clocks, IPC, sockets), and every other call fails with `EPERM`, so a program
//! sees an ordinary permission error, not a kill. A call the kernel gains later stays refused
//! until someone reads what it does and lists it here; a denylist lets it through on day one.
//!
//! The list is the one Docker's default profile grants a container holding the default
//! capability set, which is also ours: its unconditional calls, `chroot` (we keep
//! `CAP_SYS_CHROOT`), and the architecture's own calls for x86 and arm. We differ in two places:
//! `adjtimex` and `clock_adjtime` stay out (Docker lets a run read the clock's discipline with
//! them; we refused them before and nothing a batch run does needs them), and `riscv_hwprobe`
//! is left out with RISC-V itself.
//!
//! Never listed, and kept out by a test ([`REFUSED_SYSCALLS`]): kernel modules, kexec, reboot,
//! swap, setting clocks, `acct`, `syslog`, `iopl`/`ioperm`, quotas; `bpf`, `perf_event_open`,
//! `userfaultfd`, the keyring, `io_uring`; mounts old and new, `pivot_root`,
//! `unshare`/`setns`, `open_by_handle_at`; `ptrace` and `process_vm_readv`/`writev`. Most of
//! them the missing capabilities refuse too; the filter is the second wall, and the only one for
//! what needs no capability (a user namespace, `userfaultfd`, `io_uring`).
//!
//! Allowed only with some arguments, one rule per allowed case (arguments within a rule are
//! ANDed, separate rules ORed):
//! - `clone` when its flags carry no `CLONE_NEW*` flag;
//! - `clone3` fails with `ENOSYS`: its flags sit in memory where a filter cannot look, and
//!   `ENOSYS` makes the C library fall back to `clone`, whose flags the filter does check;
//! - `personality` only for the values in [`PERSONALITIES`], so a run cannot switch off
//!   address-space randomisation (`setarch -R`) or turn on `READ_IMPLIES_EXEC`;
//! - `socket` for every address family but `AF_ALG` (the kernel's crypto API, a long record of
//!   bugs) and `AF_VSOCK` (a channel to the hypervisor when the node is a VM). On 32-bit x86
//!   `socketcall` opens sockets with the family in memory, out of the filter's sight; that ABI
//!   keeps both families.
//!
//! runc skips names its libseccomp does not know, so the list names calls newer than the node's
//! libseccomp (they start to count when it learns them) and the 32-bit ABIs' own names.

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompOperator, LinuxSyscall,
};
use oci_spec::OciSpecError;

/// `EPERM`: what a call outside the list returns.
pub const EPERM: u32 = 1;
/// `ENOSYS`: what `clone3` returns, so callers fall back to `clone`.
pub const ENOSYS: u32 = 38;

/// The system calls a run may make whatever their arguments, on every architecture.
pub const ALLOWED_SYSCALLS: &[&str] = &[
    // processes and threads: start, replace, end, wait; thread and futex bookkeeping
    "fork",
    "vfork",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "wait4",
    "waitid",
    "set_tid_address",
    "set_robust_list",
    "get_robust_list",
    "rseq",
    "restart_syscall",
    "get_thread_area",
    "set_thread_area",
    "futex",
    "futex_waitv",
    "futex_wait",
    "futex_wake",
    "futex_requeue",
    "prctl",
    "seccomp",
    "uretprobe",
    "pidfd_open",
    "pidfd_send_signal",
    "process_mrelease",
    // who a process is: ids, groups, sessions, capabilities
    "getpid",
    "getppid",
    "gettid",
    "getpgid",
    "setpgid",
    "getpgrp",
    "getsid",
    "setsid",
    "getuid",
    "geteuid",
    "getresuid",
    "setuid",
    "setreuid",
    "setresuid",
    "setfsuid",
    "getgid",
    "getegid",
    "getresgid",
    "setgid",
    "setregid",
    "setresgid",
    "setfsgid",
    "getgroups",
    "setgroups",
    "capget",
    "capset",
    // resource limits, priorities, CPUs
    "getrlimit",
    "setrlimit",
    "prlimit64",
    "getrusage",
    "times",
    "getpriority",
    "setpriority",
    "ioprio_get",
    "ioprio_set",
    "sched_yield",
    "sched_getaffinity",
    "sched_setaffinity",
    "sched_getattr",
    "sched_setattr",
    "sched_getparam",
    "sched_setparam",
    "sched_getscheduler",
    "sched_setscheduler",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_rr_get_interval",
    "getcpu",
    // a process confining itself further
    "landlock_create_ruleset",
    "landlock_add_rule",
    "landlock_restrict_self",
    // signals
    "kill",
    "tkill",
    "tgkill",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "rt_sigpending",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigqueueinfo",
    "rt_tgsigqueueinfo",
    "sigaltstack",
    "pause",
    "alarm",
    // memory
    "brk",
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "mincore",
    "msync",
    "mlock",
    "mlock2",
    "mlockall",
    "munlock",
    "munlockall",
    "remap_file_pages",
    "membarrier",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "map_shadow_stack",
    "mseal",
    "memfd_create",
    "memfd_secret",
    // paths: open, look up, create, link, remove, change
    "open",
    "openat",
    "openat2",
    "creat",
    "name_to_handle_at",
    "access",
    "faccessat",
    "faccessat2",
    "stat",
    "lstat",
    "newfstatat",
    "statx",
    "statfs",
    "readlink",
    "readlinkat",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "rmdir",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "truncate",
    "chmod",
    "fchmodat",
    "fchmodat2",
    "chown",
    "lchown",
    "fchownat",
    "utime",
    "utimes",
    "utimensat",
    "futimesat",
    "chdir",
    "fchdir",
    "getcwd",
    "umask",
    // the default capabilities keep CAP_SYS_CHROOT, which is only of use with this
    "chroot",
    // extended attributes
    "getxattr",
    "lgetxattr",
    "fgetxattr",
    "getxattrat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "setxattrat",
    "listxattr",
    "llistxattr",
    "flistxattr",
    "listxattrat",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "removexattrat",
    // open files and pipes
    "read",
    "readv",
    "pread64",
    "preadv",
    "preadv2",
    "write",
    "writev",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "lseek",
    "close",
    "close_range",
    "dup",
    "dup2",
    "dup3",
    "fcntl",
    "ioctl",
    "fstat",
    "fstatfs",
    "getdents",
    "getdents64",
    "ftruncate",
    "fchmod",
    "fchown",
    "fallocate",
    "fadvise64",
    "readahead",
    "flock",
    "fsync",
    "fdatasync",
    "sync_file_range",
    "sync",
    "syncfs",
    "cachestat",
    "sendfile",
    "copy_file_range",
    "splice",
    "tee",
    "vmsplice",
    "pipe",
    "pipe2",
    // reading what is mounted (changing it is refused)
    "statmount",
    "listmount",
    // waiting on many things at once, and descriptors that stand for events
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_wait",
    "epoll_wait_old",
    "epoll_pwait",
    "epoll_pwait2",
    "eventfd",
    "eventfd2",
    "signalfd",
    "signalfd4",
    "timerfd_create",
    "timerfd_settime",
    "timerfd_gettime",
    "inotify_init",
    "inotify_init1",
    "inotify_add_watch",
    "inotify_rm_watch",
    "fanotify_mark",
    // the older asynchronous I/O (io_uring is refused)
    "io_setup",
    "io_destroy",
    "io_submit",
    "io_cancel",
    "io_getevents",
    "io_pgetevents",
    // clocks and timers, read and waited on (setting the clock is refused)
    "time",
    "gettimeofday",
    "clock_gettime",
    "clock_getres",
    "clock_nanosleep",
    "nanosleep",
    "getitimer",
    "setitimer",
    "timer_create",
    "timer_delete",
    "timer_settime",
    "timer_gettime",
    "timer_getoverrun",
    // System V and POSIX IPC (inside the run's own IPC namespace)
    "shmget",
    "shmat",
    "shmdt",
    "shmctl",
    "semget",
    "semop",
    "semtimedop",
    "semctl",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "mq_open",
    "mq_unlink",
    "mq_timedsend",
    "mq_timedreceive",
    "mq_notify",
    "mq_getsetattr",
    // sockets once open (`socket` itself has its own rules)
    "socketpair",
    "bind",
    "connect",
    "listen",
    "accept",
    "accept4",
    "getsockname",
    "getpeername",
    "getsockopt",
    "setsockopt",
    "send",
    "sendto",
    "sendmsg",
    "sendmmsg",
    "recv",
    "recvfrom",
    "recvmsg",
    "recvmmsg",
    "shutdown",
    // the machine, read only
    "uname",
    "sysinfo",
    "getrandom",
    // 32-bit ABIs (x86, arm): older entry points and multiplexers
    "_llseek",
    "_newselect",
    "mmap2",
    "waitpid",
    "sigprocmask",
    "sigreturn",
    "ugetrlimit",
    "ipc",
    "socketcall",
    // 32-bit ABIs: 64-bit file offsets and sizes
    "fcntl64",
    "stat64",
    "lstat64",
    "fstat64",
    "fstatat64",
    "statfs64",
    "fstatfs64",
    "truncate64",
    "ftruncate64",
    "fadvise64_64",
    "sendfile64",
    // 32-bit ABIs: 32-bit user and group ids
    "chown32",
    "fchown32",
    "lchown32",
    "getuid32",
    "geteuid32",
    "getresuid32",
    "setuid32",
    "setreuid32",
    "setresuid32",
    "setfsuid32",
    "getgid32",
    "getegid32",
    "getresgid32",
    "setgid32",
    "setregid32",
    "setresgid32",
    "setfsgid32",
    "getgroups32",
    "setgroups32",
    // 32-bit ABIs: 64-bit time (past 2038)
    "clock_gettime64",
    "clock_getres_time64",
    "clock_nanosleep_time64",
    "futex_time64",
    "io_pgetevents_time64",
    "mq_timedsend_time64",
    "mq_timedreceive_time64",
    "ppoll_time64",
    "pselect6_time64",
    "recvmmsg_time64",
    "rt_sigtimedwait_time64",
    "sched_rr_get_interval_time64",
    "semtimedop_time64",
    "timer_settime64",
    "timer_gettime64",
    "timerfd_settime64",
    "timerfd_gettime64",
    "utimensat_time64",
];

/// x86 only: setting the thread pointer, and the local descriptor table some 32-bit code uses.
const X86_SYSCALLS: &[&str] = &["arch_prctl", "modify_ldt"];

/// Arm only: the 32-bit ABI's reordered calls, thread pointer, and cache flushing for JITs.
const ARM_SYSCALLS: &[&str] = &[
    "arm_fadvise64_64",
    "arm_sync_file_range",
    "sync_file_range2",
    "set_tls",
    "cacheflush",
    "breakpoint",
];

/// System calls the allowlist must never gain, whatever a future edit adds to it: the profile
/// refused them when it was a denylist, and a unit test keeps every one out of the allow rules.
pub const REFUSED_SYSCALLS: &[&str] = &[
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

/// The values `personality` may be called with: plain Linux (`PER_LINUX`), a 32-bit `uname`
/// (`PER_LINUX32`), a 2.6-style kernel version (`UNAME26`), both of those, and `0xffffffff`,
/// which only reads the current value. Every other flag, among them `ADDR_NO_RANDOMIZE`, is
/// refused.
pub const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// `AF_ALG`, the first address family `socket` may not open.
pub const AF_ALG: u64 = 38;
/// `AF_VSOCK`, the other one.
pub const AF_VSOCK: u64 = 40;
/// One past the highest address family Linux defines (`AF_MCTP`, 45, since 5.15). A family
/// added later is refused until it is listed, like any new call.
const AF_END: u64 = 46;

/// The architectures the filter names system calls for: the native one and its compat ABIs,
/// so a 32-bit call cannot slip past a rule written for its 64-bit twin.
fn architectures() -> Vec<Arch> {
    if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]
    } else {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    }
}

/// Every name the allow-whatever-the-arguments rule lists on this architecture.
pub fn allowed_syscalls() -> Vec<&'static str> {
    let native = if cfg!(target_arch = "aarch64") {
        ARM_SYSCALLS
    } else {
        X86_SYSCALLS
    };
    ALLOWED_SYSCALLS.iter().chain(native).copied().collect()
}

/// The address families `socket` may open, as rules that hold up against the kernel reading
/// the family as an `int` while the filter compares all 64 bits: "below `AF_ALG`", then each
/// family above it by name. A "greater than `AF_VSOCK`" rule would let `0x1_0000_0026` through,
/// which the kernel reads as `AF_ALG`.
fn socket_family_args() -> Result<Vec<LinuxSeccompArg>, OciSpecError> {
    let mut args = vec![arg0(LinuxSeccompOperator::ScmpCmpLt, AF_ALG, None)?];
    for family in (AF_ALG + 1..AF_END).filter(|f| *f != AF_VSOCK) {
        args.push(arg0(LinuxSeccompOperator::ScmpCmpEq, family, None)?);
    }
    Ok(args)
}

fn arg0(
    op: LinuxSeccompOperator,
    value: u64,
    value_two: Option<u64>,
) -> Result<LinuxSeccompArg, OciSpecError> {
    let mut arg = LinuxSeccompArgBuilder::default()
        .index(0usize)
        .value(value)
        .op(op);
    if let Some(two) = value_two {
        arg = arg.value_two(two);
    }
    arg.build()
}

fn rule(names: &[&str], action: LinuxSeccompAction) -> LinuxSyscall {
    let mut syscall = LinuxSyscall::default();
    syscall.set_names(names.iter().map(|n| n.to_string()).collect());
    syscall.set_action(action);
    syscall
}

fn allow_when(name: &str, arg: LinuxSeccompArg) -> LinuxSyscall {
    let mut syscall = rule(&[name], LinuxSeccompAction::ScmpActAllow);
    syscall.set_args(Some(vec![arg]));
    syscall
}

/// The profile: refuse by default, allow the lists and argument rules above.
pub fn default_profile() -> Result<LinuxSeccomp, OciSpecError> {
    let mut syscalls = vec![rule(&allowed_syscalls(), LinuxSeccompAction::ScmpActAllow)];
    // `value` is the mask, `valueTwo` what the masked flags must equal: none of them set.
    let namespace_mask = CLONE_NAMESPACE_FLAGS.iter().fold(0, |m, f| m | f);
    syscalls.push(allow_when(
        "clone",
        arg0(
            LinuxSeccompOperator::ScmpCmpMaskedEq,
            namespace_mask,
            Some(0),
        )?,
    ));
    for value in PERSONALITIES {
        syscalls.push(allow_when(
            "personality",
            arg0(LinuxSeccompOperator::ScmpCmpEq, *value, None)?,
        ));
    }
    for arg in socket_family_args()? {
        syscalls.push(allow_when("socket", arg));
    }
    let mut clone3 = rule(&["clone3"], LinuxSeccompAction::ScmpActErrno);
    clone3.set_errno_ret(Some(ENOSYS));
    syscalls.push(clone3);

    let mut seccomp = LinuxSeccomp::default();
    seccomp.set_default_action(LinuxSeccompAction::ScmpActErrno);
    seccomp.set_default_errno_ret(Some(EPERM));
    seccomp.set_architectures(Some(architectures()));
    seccomp.set_syscalls(Some(syscalls));
    Ok(seccomp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::HashSet;

    fn profile_json() -> Value {
        serde_json::to_value(default_profile().expect("profile")).expect("serializes")
    }

    fn rules(json: &Value) -> &Vec<Value> {
        json["syscalls"].as_array().expect("syscalls")
    }

    fn names(rule: &Value) -> Vec<&str> {
        rule["names"]
            .as_array()
            .expect("names")
            .iter()
            .map(|n| n.as_str().expect("a name"))
            .collect()
    }

    /// What the filter answers a call to `name` with first argument `arg0`, read off the JSON
    /// the way runc's libseccomp reads it: a rule matches when all its argument comparisons
    /// hold; no rule, the default. Our rules never give one call two different actions, so the
    /// order of matching rules does not matter (checked here too).
    fn verdict(json: &Value, name: &str, arg0: u64) -> (String, u64) {
        let matching: Vec<(String, u64)> = rules(json)
            .iter()
            .filter(|r| names(r).contains(&name))
            .filter(|r| {
                r["args"].as_array().is_none_or(|args| {
                    args.iter().all(|a| {
                        assert_eq!(a["index"], 0, "{name}: only the first argument is checked");
                        let value = a["value"].as_u64().expect("value");
                        match a["op"].as_str().expect("op") {
                            "SCMP_CMP_EQ" => arg0 == value,
                            "SCMP_CMP_LT" => arg0 < value,
                            "SCMP_CMP_MASKED_EQ" => {
                                arg0 & value == a["valueTwo"].as_u64().expect("valueTwo")
                            }
                            op => panic!("{name}: {op} not modelled"),
                        }
                    })
                })
            })
            .map(|r| {
                let action = r["action"].as_str().expect("action").to_string();
                (action, r["errnoRet"].as_u64().unwrap_or(0))
            })
            .collect();
        match matching.first() {
            Some(first) => {
                assert!(matching.iter().all(|m| m == first), "{name}: {matching:?}");
                first.clone()
            }
            None => (
                json["defaultAction"].as_str().expect("default").to_string(),
                json["defaultErrnoRet"].as_u64().expect("default errno"),
            ),
        }
    }

    fn allowed(json: &Value, name: &str, arg0: u64) -> bool {
        verdict(json, name, arg0).0 == "SCMP_ACT_ALLOW"
    }

    fn refused_with_eperm(json: &Value, name: &str, arg0: u64) -> bool {
        verdict(json, name, arg0) == ("SCMP_ACT_ERRNO".to_string(), u64::from(EPERM))
    }

    #[test]
    fn refuses_by_default_with_eperm_and_names_the_compat_architectures() {
        let json = profile_json();
        assert_eq!(json["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(json["defaultErrnoRet"], EPERM);
        let arches = json["architectures"].as_array().expect("architectures");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                arches,
                &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
            );
        } else if cfg!(target_arch = "aarch64") {
            assert_eq!(arches, &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]);
        }
        // An unlisted call, whatever its arguments, gets the default.
        assert!(refused_with_eperm(&json, "no_such_call", 0));
    }

    #[test]
    fn every_formerly_denied_call_stays_refused() {
        let json = profile_json();
        for name in REFUSED_SYSCALLS {
            for r in rules(&json).iter().filter(|r| names(r).contains(name)) {
                assert_ne!(r["action"], "SCMP_ACT_ALLOW", "{name} is allowed by {r}");
            }
            for arg in [0, 1, u64::MAX] {
                assert!(refused_with_eperm(&json, name, arg), "{name}({arg})");
            }
        }
    }

    #[test]
    fn calls_docker_grants_only_with_more_capabilities_are_refused() {
        let json = profile_json();
        for name in [
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "get_mempolicy",
            "set_mempolicy",
            "set_mempolicy_home_node",
            "mbind",
            "vhangup",
            "fanotify_init",
            "sethostname",
            "setdomainname",
            "lsm_get_self_attr",
            "lsm_set_self_attr",
            "lsm_list_modules",
        ] {
            assert!(refused_with_eperm(&json, name, 0), "{name}");
        }
    }

    #[test]
    fn what_a_shell_and_a_c_or_python_program_use_is_allowed() {
        let json = profile_json();
        for name in [
            "execve",
            "brk",
            "mmap",
            "mprotect",
            "munmap",
            "arch_prctl",
            "set_tid_address",
            "set_robust_list",
            "rseq",
            "prlimit64",
            "getrandom",
            "openat",
            "newfstatat",
            "statx",
            "read",
            "write",
            "pread64",
            "lseek",
            "close",
            "fcntl",
            "ioctl",
            "getdents64",
            "readlink",
            "getcwd",
            "chdir",
            "dup2",
            "pipe2",
            "futex",
            "rt_sigaction",
            "rt_sigprocmask",
            "rt_sigreturn",
            "sigaltstack",
            "kill",
            "wait4",
            "exit_group",
            "vfork",
            "getpid",
            "getuid",
            "setuid",
            "setgroups",
            "uname",
            "sysinfo",
            "clock_gettime",
            "clock_nanosleep",
            "poll",
            "epoll_wait",
            "epoll_pwait",
            "connect",
            "sendto",
            "recvfrom",
            "mkdir",
            "unlinkat",
            "renameat2",
            "chroot",
        ] {
            if name == "arch_prctl" && !cfg!(target_arch = "x86_64") {
                continue;
            }
            assert!(allowed(&json, name, 0), "{name} is allowed");
        }
    }

    #[test]
    fn no_name_is_listed_twice() {
        let mut seen = HashSet::new();
        for name in allowed_syscalls()
            .into_iter()
            .chain(REFUSED_SYSCALLS.iter().copied())
        {
            assert!(seen.insert(name), "{name} listed twice");
        }
        for name in X86_SYSCALLS.iter().chain(ARM_SYSCALLS) {
            assert!(!ALLOWED_SYSCALLS.contains(name), "{name} listed twice");
        }
        // The argument rules are the only ones for their calls.
        for name in ["clone", "clone3", "personality", "socket"] {
            assert!(!seen.contains(name), "{name} also allowed unconditionally");
        }
    }

    #[test]
    fn clone_is_allowed_without_namespace_flags_and_clone3_falls_back() {
        let json = profile_json();
        // What fork(), posix_spawn() and pthread_create() pass.
        let sigchld = 17;
        let fork = 0x0120_0000 | sigchld; // CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID
        let spawn = 0x4100 | sigchld; // CLONE_VM | CLONE_VFORK
        let thread = 0x003d_0f00; // CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | ...
        for flags in [sigchld, fork, spawn, thread, 0x8000_0000_0000_0000] {
            assert!(allowed(&json, "clone", flags), "clone({flags:#x})");
        }
        for flag in CLONE_NAMESPACE_FLAGS {
            assert!(refused_with_eperm(&json, "clone", *flag), "{flag:#x}");
            assert!(refused_with_eperm(&json, "clone", fork | flag), "{flag:#x}");
        }
        let mask = CLONE_NAMESPACE_FLAGS.iter().fold(0, |m, f| m | f);
        // Every CLONE_NEW* flag clone(2) accepts, and nothing else (CLONE_THREAD etc. stay).
        assert_eq!(mask, 0x7E02_0000);
        for flags in [0, u64::MAX] {
            assert_eq!(
                verdict(&json, "clone3", flags),
                ("SCMP_ACT_ERRNO".to_string(), u64::from(ENOSYS))
            );
        }
    }

    #[test]
    fn personality_may_only_read_or_pick_harmless_values() {
        let json = profile_json();
        for value in [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff] {
            assert!(allowed(&json, "personality", value), "{value:#x}");
        }
        // ADDR_NO_RANDOMIZE alone and with PER_LINUX32, READ_IMPLIES_EXEC, and a high bit.
        for value in [0x4_0000, 0x4_0008, 0x40_0000, 0x1_0000_0008] {
            assert!(
                refused_with_eperm(&json, "personality", value),
                "{value:#x}"
            );
        }
    }

    #[test]
    fn socket_opens_every_family_but_alg_and_vsock() {
        let json = profile_json();
        for family in 0..AF_END {
            let refused = family == AF_ALG || family == AF_VSOCK;
            assert_eq!(
                refused_with_eperm(&json, "socket", family),
                refused,
                "family {family}"
            );
        }
        // The kernel reads the family as an int: high bits must not smuggle the two in.
        for family in [AF_ALG, AF_VSOCK] {
            for high in [1u64 << 32, 0xffff_ffff_0000_0000] {
                assert!(refused_with_eperm(&json, "socket", high | family));
            }
        }
        for (family, name) in [(1, "unix"), (2, "inet"), (10, "inet6"), (16, "netlink")] {
            assert!(allowed(&json, "socket", family), "{name}");
        }
    }
}
