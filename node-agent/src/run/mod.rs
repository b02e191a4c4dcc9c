//! One run on this node, from assignment to its last report.
//!
//! - [`supervisor`]: one task per run: pull, prepare, start, watch, stop, clean up (the life of
//!   a run in the crate doc); talks to containerd only through `runtime::ContainerRuntime`.
//! - [`spec`]: the OCI runtime spec: args/env/user, limits, capabilities, masked paths, mounts.
//! - [`seccomp`]: Berth's default seccomp profile.
//! - [`files`]: a run's uploaded files, bind-mounted read-only.
//! - [`cgroup`]: a run's OOM-kill counter and the removal of its cgroup directories.
//! - [`logs`]: output files → numbered log lines, capped per run.
//! - [`output_closed`]: knowing the shim has written all of a run's output, without deleting
//!   the task.
//! - [`user`]: the image's `USER` resolved against its own `/etc/passwd` and `/etc/group`.
//! - [`sandboxes`]: containers created ahead for warmed runners, each taken by one run.
//! - [`journal`]: what survives the agent process per run (`<state dir>/runs/<run id>/`).

pub mod cgroup;
pub mod files;
pub mod journal;
pub mod logs;
pub mod output_closed;
pub mod sandboxes;
pub mod seccomp;
pub mod spec;
pub mod supervisor;
pub mod user;
