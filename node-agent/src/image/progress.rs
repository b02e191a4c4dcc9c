//! Image pull progress: the puller counts what it fetches into a [`PullProgressState`] per image
//! (a `watch` channel anyone can subscribe to, so every run waiting on one pull sees it), and
//! [`forward`] turns the changes into throttled reports while a caller's pull runs.
//!
//! Accounting: `bytes_total` is the sum of the sizes the manifest gives for the config and the
//! layers; `bytes_done` counts the bytes actually downloaded so far plus the full size of every
//! one of those blobs that was already in the content store (skipped). Layers count as done
//! once fetched (downloaded or present); unpacking comes after and is not counted. The manifest
//! (and index) bytes are not counted: they are fetched before the total is known.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::v1::PullProgress;
use tokio::sync::watch;
use tokio::time::Instant;

/// Least time between two reports of one pull (the final report is never held back).
pub const REPORT_EVERY: Duration = Duration::from_millis(300);

/// How far one pull has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullProgressState {
    /// Grows by one per pull of the image, so a subscriber can tell a new pull from an old one.
    pub pull: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub layers_done: u32,
    pub layers_total: u32,
    /// Every blob is fetched.
    pub complete: bool,
}

/// The counting side, held by the puller while it fetches one image.
#[derive(Debug, Clone)]
pub struct ProgressTracker {
    tx: Arc<watch::Sender<PullProgressState>>,
}

impl ProgressTracker {
    pub fn new(tx: Arc<watch::Sender<PullProgressState>>) -> Self {
        Self { tx }
    }

    /// A new pull begins: totals from the manifest, nothing done yet.
    pub fn begin(&self, bytes_total: u64, layers_total: u32) {
        self.tx.send_modify(|s| {
            *s = PullProgressState {
                pull: s.pull + 1,
                bytes_total,
                layers_total,
                ..Default::default()
            }
        });
    }

    /// `bytes` more arrived (or were found present).
    pub fn add_bytes(&self, bytes: u64) {
        self.tx
            .send_modify(|s| s.bytes_done = s.bytes_done.saturating_add(bytes));
    }

    /// One more layer is fetched.
    pub fn layer_done(&self) {
        self.tx.send_modify(|s| s.layers_done += 1);
    }

    /// Every blob is fetched.
    pub fn complete(&self) {
        self.tx.send_modify(|s| s.complete = true);
    }
}

/// Per-image progress channels (created on first use, kept for the agent's life: one small
/// entry per image name).
#[derive(Debug, Default)]
pub struct ProgressHub {
    channels: Mutex<std::collections::HashMap<String, Arc<watch::Sender<PullProgressState>>>>,
}

impl ProgressHub {
    fn sender(&self, image: &str) -> Arc<watch::Sender<PullProgressState>> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels
            .entry(image.to_string())
            .or_insert_with(|| Arc::new(watch::channel(PullProgressState::default()).0))
            .clone()
    }

    pub fn tracker(&self, image: &str) -> ProgressTracker {
        ProgressTracker::new(self.sender(image))
    }

    /// Sees every change from now on (the current value counts as seen).
    pub fn subscribe(&self, image: &str) -> watch::Receiver<PullProgressState> {
        self.sender(image).subscribe()
    }
}

/// Decides which progress changes become reports: at most one per `every`, except that a
/// pull's first report and its final (complete) one always go at once.
#[derive(Debug, Clone)]
pub struct Throttle {
    every: Duration,
    last_sent: Option<Instant>,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last_sent: None,
        }
    }

    /// Whether a report may go at `now`; if so it counts as sent.
    pub fn admit(&mut self, now: Instant, is_final: bool) -> bool {
        let due = self
            .last_sent
            .is_none_or(|last| now.duration_since(last) >= self.every);
        if due || is_final {
            self.last_sent = Some(now);
        }
        due || is_final
    }

    /// When a held-back report may go.
    pub fn next_due(&self) -> Instant {
        self.last_sent
            .map_or_else(Instant::now, |last| last + self.every)
    }
}

/// Runs `pull` while turning the changes `progress` sees into throttled calls of `report` (at
/// most one per `every`, the first and the complete one at once), and reports the last state seen
/// before returning, so the final figures are never lost to throttling. Nothing is reported when
/// the pull changed nothing (the image was already present).
pub async fn forward<T>(
    pull: impl Future<Output = T>,
    progress: &mut watch::Receiver<PullProgressState>,
    every: Duration,
    report: &mut impl FnMut(PullProgressState),
) -> T {
    let mut pull = std::pin::pin!(pull);
    let mut throttle = Throttle::new(every);
    let mut held: Option<PullProgressState> = None;
    let mut last_reported: Option<PullProgressState> = None;
    let mut channel_open = true;
    loop {
        tokio::select! {
            result = &mut pull => {
                // The puller may have finished before this loop saw its last change.
                let fresh = progress.has_changed().unwrap_or(false);
                let latest = *progress.borrow_and_update();
                let saw_this_pull = fresh || held.is_some() || last_reported.is_some();
                if saw_this_pull && Some(latest) != last_reported {
                    report(latest);
                }
                return result;
            }
            changed = progress.changed(), if channel_open => {
                if changed.is_err() {
                    channel_open = false;
                    continue;
                }
                let state = *progress.borrow_and_update();
                if throttle.admit(Instant::now(), state.complete) {
                    held = None;
                    last_reported = Some(state);
                    report(state);
                } else {
                    held = Some(state);
                }
            }
            _ = tokio::time::sleep_until(throttle.next_due()), if held.is_some() => {
                if let Some(state) = held.take() {
                    throttle.admit(Instant::now(), false);
                    last_reported = Some(state);
                    report(state);
                }
            }
        }
    }
}

/// The report for a run's pull.
pub fn run_report(
    run_id: &str,
    lease_epoch: u64,
    image: &str,
    state: PullProgressState,
) -> PullProgress {
    PullProgress {
        run_id: run_id.to_string(),
        lease_epoch,
        runner_id: String::new(),
        image: image.to_string(),
        bytes_done: state.bytes_done,
        bytes_total: state.bytes_total,
        layers_done: state.layers_done,
        layers_total: state.layers_total,
        complete: state.complete,
    }
}

/// The report for a warmup's pull.
pub fn warmup_report(runner_id: &str, image: &str, state: PullProgressState) -> PullProgress {
    PullProgress {
        runner_id: runner_id.to_string(),
        ..run_report("", 0, image, state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn throttle_admits_first_then_one_per_interval_and_always_the_final() {
        let mut t = Throttle::new(Duration::from_millis(300));
        let t0 = Instant::now();
        assert!(t.admit(t0, false), "first report goes at once");
        assert!(!t.admit(t0 + Duration::from_millis(100), false));
        assert!(!t.admit(t0 + Duration::from_millis(299), false));
        assert!(t.admit(t0 + Duration::from_millis(300), false));
        assert!(
            t.admit(t0 + Duration::from_millis(310), true),
            "final goes at once"
        );
        assert_eq!(t.next_due(), t0 + Duration::from_millis(610));
    }

    #[tokio::test(start_paused = true)]
    async fn tracker_counts_downloaded_and_present_bytes_and_layers() {
        let hub = ProgressHub::default();
        let rx = hub.subscribe("img");
        let tracker = hub.tracker("img");
        tracker.begin(1_000, 2);
        tracker.add_bytes(100); // config, already present
        tracker.add_bytes(300);
        tracker.add_bytes(200);
        tracker.layer_done();
        tracker.add_bytes(400); // second layer, already present
        tracker.layer_done();
        tracker.complete();
        let state = *rx.borrow();
        assert_eq!(
            state,
            PullProgressState {
                pull: 1,
                bytes_done: 1_000,
                bytes_total: 1_000,
                layers_done: 2,
                layers_total: 2,
                complete: true,
            }
        );
        tracker.begin(50, 1);
        assert_eq!(rx.borrow().pull, 2, "a new pull starts from zero");
        assert_eq!(rx.borrow().bytes_done, 0);
    }

    /// A pull that counts 10 chunks of 100 bytes, one every 50 ms: the reports are throttled to
    /// one per 300 ms, never go backwards, and the last one is the complete state.
    #[tokio::test(start_paused = true)]
    async fn forwarding_throttles_and_always_ends_with_the_final_state() {
        let hub = ProgressHub::default();
        let mut rx = hub.subscribe("img");
        let tracker = hub.tracker("img");
        let pull = async move {
            tracker.begin(1_000, 1);
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                tracker.add_bytes(100);
            }
            tracker.layer_done();
            tracker.complete();
            "done"
        };
        let mut reports: Vec<(Instant, PullProgressState)> = Vec::new();
        let out = forward(pull, &mut rx, Duration::from_millis(300), &mut |s| {
            reports.push((Instant::now(), s))
        })
        .await;
        assert_eq!(out, "done");
        let last = reports.last().map(|(_, s)| *s).unwrap_or_default();
        assert!(last.complete && last.bytes_done == 1_000 && last.layers_done == 1);
        assert!(
            reports.len() <= 4,
            "throttled: {} reports for 13 changes",
            reports.len()
        );
        assert!(reports.len() >= 2, "progress before the end: {reports:?}");
        for pair in reports.windows(2) {
            assert!(pair[1].1.bytes_done >= pair[0].1.bytes_done, "{reports:?}");
            if !pair[1].1.complete {
                assert!(pair[1].0 - pair[0].0 >= Duration::from_millis(300));
            }
        }
    }

    /// Nothing is reported for a pull that fetched nothing (the image was present).
    #[tokio::test(start_paused = true)]
    async fn no_reports_when_nothing_was_pulled() {
        let hub = ProgressHub::default();
        let mut rx = hub.subscribe("img");
        let mut reports = 0;
        forward(async {}, &mut rx, Duration::from_millis(300), &mut |_| {
            reports += 1
        })
        .await;
        assert_eq!(reports, 0);
    }
}
