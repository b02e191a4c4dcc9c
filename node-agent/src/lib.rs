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
//!   client it uses, [`reference`] and [`manifest`] parse what it fetches; [`pull_progress`]
//!   counts a pull's bytes and layers and throttles the reports; [`image_cache`] keeps the
//!   images within `--image-cache-bytes` (LRU, sparing images in use or pinned by a warmup)
//!   over [`image_store`], its containerd side.
//! - [`journal`]: what survives the agent process per run (`<state dir>/runs/<run id>/`): the
//!   assignment, start time, raw output, the numbered line log, acknowledged lines, the exit.
//! - [`files`]: a run's uploaded files, written under its journal directory (`files/`, 0700)
//!   before the container exists, bind-mounted read-only at their paths, removed at cleanup.
//! - [`spec`]: the OCI runtime spec for a run (memory limit with no swap beyond it, CPU quota,
//!   `pids.max` from `--pids-limit`); [`logs`]: output files → numbered log lines, capped per
//!   run (`--max-log-bytes-per-run`, `--max-log-lines-per-run`), consumed output punched out of
//!   the files; [`seccomp`]: the default seccomp profile; [`network`]: each run's network
//!   namespace through the CNI plugins, [`firewall`]: the iptables rules that keep runs away
//!   from the host's ports and from each other;
//!   [`cgroup`]: a run's OOM-kill counter and removal of its cgroup directories;
//!   [`clock`]: timestamps; [`config`]: the node settings from the CLI.
//!
//! ## The life of a run on a node
//! 1. `AssignRun` arrives on the session; the agent spawns a supervisor for it.
//! 2. The image is pulled (de-duplicated per image; skipped when present and unpacked), with the
//!    run's registry credentials when it has some (never logged, never written to disk).
//! 3. The spec is built (entrypoint/cmd/env/user resolution, limits, cgroup
//!    `/<cgroup-parent>/<run-id>`); the run's journal is written (`run.json`, empty output
//!    files); the run's network namespace is made and connected, a snapshot `<run-id>` is
//!    prepared on the image's top chain ID, the container created (joined to that namespace), the task created with its stdout/stderr appended by the shim to the journal's
//!    output files.
//! 4. The exit is watched *before* the task starts; the start time goes into `run.json`, then
//!    `RunStarted` into the outbox.
//! 5. The log pump tails the output files; each line is numbered, appended to the line log and
//!    only then queued. Past the run's log cap one marker line goes to stderr and the rest of
//!    the output is skipped unread; the run is never blocked by its output.
//! 6. The run ends by itself (EXITED), by its timeout (SIGTERM, grace, SIGKILL; TIMEOUT, 124) or
//!    by `StopRun` (same signals; STOPPED). A stop during the pull ends it as STOPPED, -1. A
//!    run that exited non-zero while its memory cgroup counts an OOM kill is reported
//!    `oom_killed` (read before the task is deleted, which removes the cgroup).
//! 7. The task is deleted (the shim finishes copying output first), the rest of the output is
//!    numbered and queued, the ending is written to `exit.json`, everything else is cleaned up
//!    (container, snapshot, lease, cgroups, network namespace and address) and `RunExited` is
//!    queued last.
//! 8. The run stays in the agent's active list until the scheduler acknowledges its
//!    `RunExited`; then its journal is removed.
//!
//! ## Recovery after the agent process dies
//! Containers outlive the agent (`kill -9`, crash). A new process, before it registers, reads
//! every journal ([`session::Agent::recover`]):
//! - started, no `exit.json`: the run is re-adopted ([`supervisor::resume`]): `RunStarted` and
//!   every line above the acknowledged seq are queued again, the pump continues at the line log's
//!   offsets and next seq (output written meanwhile, and a partial line the old process had read,
//!   are still in the files), `Wait` gives the real exit (at once if it already happened), the
//!   timeout counts from the recorded start, then steps 7–8;
//! - `exit.json` present: its unacknowledged lines and `RunExited` are queued again, cleanup is
//!   repeated;
//! - never started: container and journal are removed; the run is not listed in `Register`, so
//!   the scheduler re-queues it;
//! - a container without a journal: removed;
//! - a network namespace of a run not re-adopted: released (`DEL`, unmount).
//!
//! Re-adopted runs are listed in `Register.active_run_ids`, so the scheduler keeps their leases;
//! it de-duplicates re-sent lines by (run, seq) and re-sent reports by lease epoch and state.
//!
//! ## Graceful shutdown
//! SIGTERM (or SIGINT) makes the agent drain ([`session::Agent::drain`]): new assignments are
//! answered at once with `RunExited { START_FAILED, error_code: "node_draining" }`; the session
//! stays up so running runs keep reporting lines and exits; once every run has ended and every
//! report is acknowledged — or `--shutdown-grace-seconds` (default 30) is over — the process
//! exits 0. Runs still going are left to containerd and re-adopted by the next start, as after a
//! crash. A second signal exits at once.

pub mod cgroup;
pub mod clock;
pub mod config;
pub mod containerd;
pub mod files;
pub mod firewall;
pub mod image_cache;
pub mod image_store;
pub mod journal;
pub mod logs;
pub mod manifest;
pub mod network;
pub mod outbox;
pub mod pull;
pub mod pull_progress;
pub mod reference;
pub mod registry;
pub mod runtime;
pub mod seccomp;
pub mod session;
pub mod spec;
pub mod supervisor;
