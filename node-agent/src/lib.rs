//! # Layout
//! The Berth node agent: runs containers through containerd on behalf of the scheduler.
//!
//! - [`session`]: the one outbound gRPC stream to the scheduler (`AgentService.Attach`):
//!   register, heartbeat, receive assignments and stops, reconnect with backoff.
//! - [`outbox`]: at-least-once delivery of reports (`seq`, cumulative `Ack`, re-send on
//!   reconnect).
//! - [`supervisor`]: one task per run, the run lifecycle below; talks to the engine only
//!   through [`runtime::ContainerRuntime`].
//! - [`containerd`]: the real `ContainerRuntime` over containerd's gRPC API; [`pull`] pulls
//!   and unpacks images into containerd's content store, [`registry`] is the OCI distribution
//!   client it uses, [`reference`] and [`manifest`] parse what it fetches.
//! - [`spec`]: the OCI runtime spec for a run; [`logs`]: FIFO output → numbered log lines;
//!   [`cgroup`]: removal of per-run cgroup directories; [`clock`]: timestamps.
//!
//! ## The life of a run on a node
//! 1. `AssignRun` arrives on the session; the agent spawns a supervisor for it.
//! 2. The image is pulled (de-duplicated per image; skipped when present and unpacked).
//! 3. The spec is built (entrypoint/cmd/env/user resolution, limits, cgroup
//!    `/<cgroup-parent>/<run-id>`); a snapshot `<run-id>` is prepared on the image's top chain ID,
//!    the container created, the stdout/stderr FIFOs opened, the task created.
//! 4. The exit is watched *before* the task starts; `RunStarted` goes to the outbox.
//! 5. The run ends by itself (EXITED), by its timeout (SIGTERM, grace, SIGKILL; TIMEOUT, 124) or
//!    by `StopRun` (same signals; STOPPED). A stop during the pull ends it as STOPPED, -1.
//! 6. Output is drained to EOF (bounded), every line queued, then everything is cleaned up
//!    (task, container, snapshot, FIFOs, cgroups) and `RunExited` is queued last.
//! 7. The run stays in the agent's active list until the scheduler acknowledges its
//!    `RunExited`.

pub mod cgroup;
pub mod clock;
pub mod config;
pub mod containerd;
pub mod logs;
pub mod manifest;
pub mod outbox;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod runtime;
pub mod session;
pub mod spec;
pub mod supervisor;
