//! Ready sandboxes (issue #13, item 3): containers created ahead for the runs of a warmed
//! runner, so such a run only has to start its process.
//!
//! A runner's warmup may ask its node to keep `count` sandboxes; the scheduler sends the node
//! the whole set with its pins (`WarmPins.sandboxes`: runner, count, and the `RunSpec` of a run
//! of that runner with no overrides). [`keep_ready`] makes each one exactly as a run's start
//! would — image resolved, image user, the same OCI spec (`build_spec`), the network attached,
//! snapshot, container and task created (`runc create`: the process exists, stopped before
//! `exec`) — under an id of its own (`sbx-<uuid>`), with its output going to two empty files
//! in `<state>/sandboxes/<id>/`.
//!
//! A run takes one ([`Sandboxes::take`]) only when everything that shapes its process is the
//! same: its runner, the image digest it resolved, and its OCI spec as the supervisor built it
//! for the run, compared whole except for the two fields that carry the container's id (the
//! hostname and the cgroup path). Any override that changes the process — command, env,
//! files, a changed runner — makes the spec differ, and the run creates its own container as
//! before. A taken sandbox is the run's container from then on (the runtime's
//! `use_container`; the journal records it) and is removed with the run: a sandbox serves one
//! run, never two, and none is shared between runners.
//!
//! Sandboxes hold no memory of their own on the agent's books: the scheduler holds the
//! runner's memory for each on the node while the pin stands. Unused ones are recreated after
//! `max_idle` (a fresh container, not one that waited for hours), removed when their runner's
//! pin goes or its spec changes, and all of them at a graceful stop; those an earlier agent
//! process left are swept with every other leftover container at start.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use berth_proto::v1::RunSpec;
use oci_spec::runtime::Spec;
use prost::Message;
use tokio::sync::Notify;

use crate::run::spec::{build_spec, SpecInputs};
use crate::run::user::resolve as resolve_user;
use crate::runtime::{ContainerRuntime, OutputFiles};

/// Container ids of sandboxes start with this.
pub const SANDBOX_PREFIX: &str = "sbx-";

/// A refill waits this long after a take, so its `Tasks.Create` does not compete for the CPU
/// with the start of the run that took the sandbox (the same reason as the network pool's).
const REFILL_DELAY: Duration = Duration::from_millis(250);

/// After a failed creation, a runner's next try waits this long (doubling up to the max).
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What a runner's pin asks for.
#[derive(Debug, Clone)]
struct Wanted {
    count: usize,
    spec: RunSpec,
    /// The spec's encoding: a sandbox made for another one is replaced.
    key: Vec<u8>,
}

/// A created sandbox waiting for a run.
#[derive(Debug, Clone)]
struct Ready {
    id: String,
    runner_id: String,
    key: Vec<u8>,
    image_digest: String,
    fingerprint: String,
    output: OutputFiles,
    created: Instant,
}

#[derive(Debug, Default)]
struct PoolState {
    /// Runner id → what its pin asks for; None until the scheduler's first set.
    wanted: Option<BTreeMap<String, Wanted>>,
    ready: Vec<Ready>,
    /// Sandboxes being created now, per runner.
    creating: HashMap<String, usize>,
    /// Sandboxes to remove (taken but unusable).
    doomed: Vec<String>,
    last_take: Option<Instant>,
    /// Per runner: no new try before this, and the delay after the next failure.
    backoff: HashMap<String, (Instant, Duration)>,
    /// The agent is stopping: no new sandbox.
    closed: bool,
}

/// The node's ready sandboxes (see the module documentation).
pub struct Sandboxes {
    dir: PathBuf,
    /// Most sandboxes on the node, all runners together.
    max: usize,
    max_idle: Duration,
    state: Mutex<PoolState>,
    wake: Notify,
}

impl std::fmt::Debug for Sandboxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandboxes")
            .field("dir", &self.dir)
            .field("max", &self.max)
            .field("max_idle", &self.max_idle)
            .finish_non_exhaustive()
    }
}

/// What the spec of a sandbox and a run's spec must share for the run to take it: the whole
/// spec but the hostname and the cgroup path, which carry the container's id. The capability
/// sets are sets (their order in JSON is arbitrary): sorted here.
pub fn fingerprint(spec: &Spec) -> String {
    let mut spec = spec.clone();
    spec.set_hostname(None);
    if let Some(linux) = spec.linux_mut() {
        linux.set_cgroups_path(None);
    }
    let mut json = serde_json::to_value(&spec).unwrap_or_default();
    if let Some(caps) = json
        .pointer_mut("/process/capabilities")
        .and_then(|c| c.as_object_mut())
    {
        for set in caps.values_mut() {
            if let Some(list) = set.as_array_mut() {
                list.sort_by_key(|c| c.to_string());
            }
        }
    }
    json.to_string()
}

impl Sandboxes {
    /// A pool keeping its sandboxes' output files under `dir`, which it empties now (what an
    /// earlier process left there belongs to sandboxes swept at start).
    pub fn new(dir: PathBuf, max: usize, max_idle: Duration) -> std::io::Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            max,
            max_idle,
            state: Mutex::default(),
            wake: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The scheduler's whole set: runner id → (count, spec). Runners missing lose theirs.
    pub fn set_wanted(&self, wanted: impl IntoIterator<Item = (String, u32, RunSpec)>) {
        let wanted = wanted
            .into_iter()
            .filter(|(_, count, _)| *count > 0)
            .map(|(runner, count, spec)| {
                let key = spec.encode_to_vec();
                let count = usize::try_from(count).unwrap_or(usize::MAX);
                (runner, Wanted { count, spec, key })
            })
            .collect();
        self.state().wanted = Some(wanted);
        self.wake.notify_one();
    }

    /// Ready sandboxes now, per runner (for logs and tests).
    pub fn ready_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for r in &self.state().ready {
            *counts.entry(r.runner_id.clone()).or_default() += 1;
        }
        counts
    }

    /// Takes a ready sandbox for a run of `runner_id` whose image resolved to `image_digest`
    /// and whose spec is `spec`, moving its (empty) output files to `output`. Returns the
    /// sandbox's container id, or None when no sandbox fits: the run creates its own.
    pub fn take(
        &self,
        runner_id: &str,
        image_digest: &str,
        spec: &Spec,
        output: &OutputFiles,
    ) -> Option<String> {
        let taken = {
            let mut st = self.state();
            if st.ready.is_empty() {
                return None;
            }
            let fingerprint = fingerprint(spec);
            let Some(index) = st.ready.iter().position(|r| {
                r.runner_id == runner_id
                    && r.image_digest == image_digest
                    && r.fingerprint == fingerprint
            }) else {
                if let Some(r) = st.ready.iter().find(|r| r.runner_id == runner_id) {
                    tracing::debug!(
                        sandbox = %r.id,
                        same_image = r.image_digest == image_digest,
                        sandbox_spec = %r.fingerprint,
                        run_spec = %fingerprint,
                        "the runner's sandbox does not fit the run"
                    );
                }
                // The runner's tag moved on: its sandboxes of the old image would only wait
                // for their idle limit; they are replaced now.
                let stale: Vec<String> = st
                    .ready
                    .iter()
                    .filter(|r| r.runner_id == runner_id && r.image_digest != image_digest)
                    .map(|r| r.id.clone())
                    .collect();
                if !stale.is_empty() {
                    st.ready.retain(|r| !stale.contains(&r.id));
                    st.doomed.extend(stale);
                    drop(st);
                    self.wake.notify_one();
                }
                return None;
            };
            st.last_take = Some(Instant::now());
            st.ready.swap_remove(index)
        };
        self.wake.notify_one();
        let moved = std::fs::rename(&taken.output.stdout, &output.stdout)
            .and_then(|()| std::fs::rename(&taken.output.stderr, &output.stderr));
        if let Err(error) = moved {
            tracing::warn!(sandbox = %taken.id, %error, "cannot move the sandbox's output files; the run creates its own container");
            self.state().doomed.push(taken.id);
            self.wake.notify_one();
            return None;
        }
        let _ = std::fs::remove_dir(self.dir.join(&taken.id));
        Some(taken.id)
    }

    /// Stops making sandboxes: [`keep_ready`] removes every one and returns.
    pub fn close(&self) {
        self.state().closed = true;
        self.wake.notify_one();
    }

    /// What the keeper should do next.
    fn next_step(&self, now: Instant) -> Step {
        let mut st = self.state();
        if let Some(id) = st.doomed.pop() {
            return Step::Remove(id);
        }
        if st.closed {
            return match st.ready.pop() {
                Some(r) => Step::Remove(r.id),
                None => Step::Stop,
            };
        }
        let Some(wanted) = st.wanted.clone() else {
            return Step::Wait(None);
        };
        // Sandboxes whose runner no longer asks for them, made for another spec, or idle too
        // long; and beyond a runner's count (it was lowered).
        let mut kept: HashMap<&str, usize> = HashMap::new();
        let mut retire = None;
        for (i, r) in st.ready.iter().enumerate() {
            let fits = wanted.get(&r.runner_id).is_some_and(|w| {
                w.key == r.key && *kept.get(r.runner_id.as_str()).unwrap_or(&0) < w.count
            });
            if !fits || now.duration_since(r.created) >= self.max_idle {
                retire = Some(i);
                break;
            }
            *kept.entry(r.runner_id.as_str()).or_default() += 1;
        }
        if let Some(i) = retire {
            let r = st.ready.swap_remove(i);
            return Step::Remove(r.id);
        }
        let total = st.ready.len() + st.creating.values().sum::<usize>();
        let mut soonest: Option<Instant> = st.ready.iter().map(|r| r.created + self.max_idle).min();
        if total < self.max {
            if let Some(delay) = st
                .last_take
                .map(|t| REFILL_DELAY.saturating_sub(now.duration_since(t)))
                .filter(|d| !d.is_zero())
            {
                return Step::Wait(Some(now + delay));
            }
            for (runner_id, w) in &wanted {
                let have = kept.get(runner_id.as_str()).copied().unwrap_or(0)
                    + st.creating.get(runner_id).copied().unwrap_or(0);
                if have >= w.count {
                    continue;
                }
                if let Some(&(until, _)) = st.backoff.get(runner_id) {
                    if until > now {
                        soonest = Some(soonest.map_or(until, |s| s.min(until)));
                        continue;
                    }
                }
                *st.creating.entry(runner_id.clone()).or_default() += 1;
                return Step::Create {
                    runner_id: runner_id.clone(),
                    spec: Box::new(w.spec.clone()),
                    key: w.key.clone(),
                };
            }
        }
        Step::Wait(soonest)
    }

    fn created(&self, runner_id: &str, ready: Option<Ready>) {
        let mut st = self.state();
        if let Some(n) = st.creating.get_mut(runner_id) {
            *n = n.saturating_sub(1);
        }
        match ready {
            Some(ready) => {
                st.backoff.remove(runner_id);
                if st.closed {
                    st.doomed.push(ready.id);
                } else {
                    st.ready.push(ready);
                }
            }
            None => {
                let now = Instant::now();
                let delay = st
                    .backoff
                    .get(runner_id)
                    .map_or(RETRY_FIRST, |&(_, d)| (d * 2).min(RETRY_MAX));
                st.backoff
                    .insert(runner_id.to_owned(), (now + delay, delay));
            }
        }
    }
}

enum Step {
    Create {
        runner_id: String,
        spec: Box<RunSpec>,
        key: Vec<u8>,
    },
    Remove(String),
    Wait(Option<Instant>),
    Stop,
}

/// How sandboxes are made: what a supervisor uses to build a run's spec.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    pub cgroup_parent: String,
    pub pids_limit: i64,
}

/// Keeps `pool` filled through `runtime`, one sandbox at a time, until the pool is closed;
/// then removes every sandbox and returns.
pub async fn keep_ready<R: ContainerRuntime>(
    pool: Arc<Sandboxes>,
    runtime: Arc<R>,
    settings: SandboxSettings,
) {
    loop {
        match pool.next_step(Instant::now()) {
            Step::Stop => return,
            Step::Remove(id) => remove(&*runtime, &pool.dir, &id).await,
            Step::Create {
                runner_id,
                spec,
                key,
            } => {
                let healthy = runtime.health().is_none_or(|h| h.borrow().takes_runs());
                let ready = if healthy {
                    create(&*runtime, &pool.dir, &settings, &runner_id, &spec, key).await
                } else {
                    None
                };
                pool.created(&runner_id, ready);
            }
            Step::Wait(until) => {
                let woken = pool.wake.notified();
                match until {
                    Some(until) => {
                        let _ = tokio::time::timeout_at(until.into(), woken).await;
                    }
                    None => woken.await,
                }
            }
        }
    }
}

async fn remove<R: ContainerRuntime>(runtime: &R, dir: &Path, id: &str) {
    tracing::debug!(sandbox = id, "removing a sandbox");
    runtime.cleanup(id).await;
    runtime.release_image(id);
    let _ = std::fs::remove_dir_all(dir.join(id));
}

async fn create<R: ContainerRuntime>(
    runtime: &R,
    dir: &Path,
    settings: &SandboxSettings,
    runner_id: &str,
    spec: &RunSpec,
    key: Vec<u8>,
) -> Option<Ready> {
    let id = format!("{SANDBOX_PREFIX}{}", uuid::Uuid::new_v4().simple());
    runtime.hold_image(&id, &spec.image);
    match make(runtime, dir, settings, &id, spec).await {
        Ok((image_digest, fingerprint, output)) => {
            tracing::info!(sandbox = %id, runner_id, "sandbox ready");
            Some(Ready {
                id,
                runner_id: runner_id.to_owned(),
                key,
                image_digest,
                fingerprint,
                output,
                created: Instant::now(),
            })
        }
        Err(error) => {
            tracing::warn!(sandbox = %id, runner_id, %error, "creating a sandbox failed");
            remove(runtime, dir, &id).await;
            None
        }
    }
}

async fn make<R: ContainerRuntime>(
    runtime: &R,
    dir: &Path,
    settings: &SandboxSettings,
    id: &str,
    spec: &RunSpec,
) -> Result<(String, String, OutputFiles), String> {
    let image = runtime
        .pull_image(&spec.image, spec.registry_auth.as_ref())
        .await
        .map_err(|e| e.to_string())?;
    let accounts = runtime
        .image_accounts(&image)
        .await
        .map_err(|e| e.to_string())?;
    let user =
        resolve_user(image.config.user().as_deref(), &accounts).map_err(|e| e.to_string())?;
    let oci = build_spec(&SpecInputs {
        run_id: id,
        run: spec,
        image: &image.config,
        cgroup_parent: &settings.cgroup_parent,
        pids_limit: settings.pids_limit,
        user: &user,
    })
    .map_err(|e| e.to_string())?;
    let home = dir.join(id);
    std::fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
    let output = OutputFiles {
        stdout: home.join("stdout"),
        stderr: home.join("stderr"),
    };
    for path in [&output.stdout, &output.stderr] {
        std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    runtime
        .create(id, &image, &oci, &output)
        .await
        .map_err(|e| e.to_string())?;
    Ok((image.digest, fingerprint(&oci), output))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cmd: &str) -> RunSpec {
        RunSpec {
            image: "127.0.0.1:5001/busybox:latest".into(),
            cmd_set: true,
            cmd: vec![cmd.into()],
            memory_mib: 64,
            ..RunSpec::default()
        }
    }

    fn pool(max: usize) -> (tempfile::TempDir, Sandboxes) {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Sandboxes::new(dir.path().join("sandboxes"), max, Duration::from_secs(600))
            .expect("pool");
        (dir, pool)
    }

    fn ready(pool: &Sandboxes, id: &str, runner: &str, key: Vec<u8>, fp: &str) -> Ready {
        let home = pool.dir.join(id);
        std::fs::create_dir_all(&home).expect("dir");
        let output = OutputFiles {
            stdout: home.join("stdout"),
            stderr: home.join("stderr"),
        };
        std::fs::write(&output.stdout, b"").expect("stdout");
        std::fs::write(&output.stderr, b"").expect("stderr");
        Ready {
            id: id.into(),
            runner_id: runner.into(),
            key,
            image_digest: "sha256:a".into(),
            fingerprint: fp.into(),
            output,
            created: Instant::now(),
        }
    }

    /// Two specs built apart for one run spec (one for the sandbox, one for the run) have one
    /// fingerprint; a different process has another.
    #[test]
    fn specs_built_apart_for_one_run_share_a_fingerprint() {
        use crate::image::manifest::ImageRunConfig;
        use crate::run::user::ExecUser;
        let build = |id: &str, run: &RunSpec| {
            build_spec(&SpecInputs {
                run_id: id,
                run,
                image: &ImageRunConfig::default(),
                cgroup_parent: "berth/n1",
                pids_limit: 100,
                user: &ExecUser::root(),
            })
            .expect("spec")
        };
        let mut run = spec("echo hi");
        run.env = (0..20)
            .map(|i| (format!("K{i}"), format!("v{i}")))
            .collect();
        let sandbox = build("sbx-1", &run);
        let mut again = run.clone();
        let mut pairs: Vec<(String, String)> = run.env.clone().into_iter().collect();
        pairs.reverse();
        again.env = pairs.into_iter().collect();
        assert_eq!(fingerprint(&sandbox), fingerprint(&build("run-1", &again)));
        assert_ne!(
            fingerprint(&sandbox),
            fingerprint(&build("run-1", &spec("echo other")))
        );
    }

    #[test]
    fn nothing_is_made_before_the_schedulers_first_set() {
        let (_d, pool) = pool(4);
        assert!(matches!(pool.next_step(Instant::now()), Step::Wait(None)));
    }

    #[test]
    fn each_runner_gets_its_count_within_the_node_bound() {
        let (_d, pool) = pool(3);
        pool.set_wanted([
            ("a".to_string(), 2, spec("x")),
            ("b".to_string(), 5, spec("y")),
        ]);
        let mut made = Vec::new();
        while let Step::Create { runner_id, .. } = pool.next_step(Instant::now()) {
            made.push(runner_id);
        }
        assert_eq!(made, ["a", "a", "b"], "a gets 2, b what is left of 3");
    }

    #[test]
    fn a_sandbox_for_another_runner_image_or_spec_is_never_taken_and_one_is_taken_once() {
        let (d, pool) = pool(4);
        let key = spec("x").encode_to_vec();
        let mut oci = Spec::default();
        oci.set_hostname(Some("sbx-1".into()));
        let fp = fingerprint(&oci);
        pool.state()
            .ready
            .push(ready(&pool, "sbx-1", "a", key, &fp));
        let out = OutputFiles {
            stdout: d.path().join("out"),
            stderr: d.path().join("err"),
        };
        // The run's own spec names the run, not the sandbox: still the same process.
        let mut run_spec = oci.clone();
        run_spec.set_hostname(Some("run-1".into()));
        assert_eq!(pool.take("b", "sha256:a", &run_spec, &out), None);
        let mut other = run_spec.clone();
        if let Some(process) = other.process_mut() {
            process.set_args(Some(vec!["env".into()]));
        }
        assert_eq!(pool.take("a", "sha256:a", &other, &out), None);
        assert_eq!(
            pool.take("a", "sha256:a", &run_spec, &out).as_deref(),
            Some("sbx-1")
        );
        assert!(out.stdout.is_file() && out.stderr.is_file(), "output moved");
        assert!(!pool.dir.join("sbx-1").exists());
        assert_eq!(
            pool.take("a", "sha256:a", &run_spec, &out),
            None,
            "used once"
        );
        // A run of the runner's image under another digest (the tag moved): no sandbox, and
        // the runner's sandboxes of the old one are replaced at once.
        let key = spec("x").encode_to_vec();
        pool.state()
            .ready
            .push(ready(&pool, "sbx-2", "a", key, &fp));
        assert_eq!(pool.take("a", "sha256:b", &run_spec, &out), None);
        assert!(pool.state().ready.is_empty());
        assert!(matches!(pool.next_step(Instant::now()), Step::Remove(id) if id == "sbx-2"));
    }

    #[test]
    fn sandboxes_of_a_changed_spec_or_a_dropped_runner_are_removed_and_a_take_delays_refills() {
        let (_d, pool) = pool(4);
        pool.set_wanted([("a".to_string(), 1, spec("x"))]);
        let old = spec("old").encode_to_vec();
        pool.state()
            .ready
            .push(ready(&pool, "sbx-old", "a", old, "f"));
        assert!(matches!(pool.next_step(Instant::now()), Step::Remove(id) if id == "sbx-old"));
        assert!(matches!(
            pool.next_step(Instant::now()),
            Step::Create { .. }
        ));
        pool.created("a", None);
        // After a failure the runner waits.
        assert!(matches!(
            pool.next_step(Instant::now()),
            Step::Wait(Some(_))
        ));
        pool.set_wanted([]);
        let key = spec("x").encode_to_vec();
        pool.state()
            .ready
            .push(ready(&pool, "sbx-2", "a", key, "f"));
        assert!(matches!(pool.next_step(Instant::now()), Step::Remove(id) if id == "sbx-2"));
        pool.set_wanted([("a".to_string(), 1, spec("x"))]);
        pool.state().backoff.clear();
        pool.state().last_take = Some(Instant::now());
        assert!(matches!(
            pool.next_step(Instant::now()),
            Step::Wait(Some(_))
        ));
        assert!(matches!(
            pool.next_step(Instant::now() + REFILL_DELAY),
            Step::Create { .. }
        ));
    }

    #[test]
    fn idle_sandboxes_are_recreated_and_close_hands_back_every_one() {
        let (_d, pool) = pool(4);
        let key = spec("x").encode_to_vec();
        pool.set_wanted([("a".to_string(), 2, spec("x"))]);
        pool.state()
            .ready
            .push(ready(&pool, "sbx-1", "a", key.clone(), "f"));
        pool.state()
            .ready
            .push(ready(&pool, "sbx-2", "a", key, "f"));
        let later = Instant::now() + Duration::from_secs(601);
        assert!(matches!(pool.next_step(later), Step::Remove(_)));
        pool.close();
        assert!(matches!(pool.next_step(Instant::now()), Step::Remove(_)));
        assert!(matches!(pool.next_step(Instant::now()), Step::Stop));
    }
}
