//! Why a node's agent sessions fail, for the node's view: the error that ended its last session,
//! kept until the node next delivers a report. Memory only, like liveness, and outside the
//! engine's lock so recording it never waits for the engine.
//!
//! It also tracks the node's *failure streak*: since when its sessions keep ending in errors
//! without a report delivered. Registering and heartbeats renew a node's liveness, so an agent
//! that reconnects forever and never gets a report through would otherwise never be `lost`;
//! `expire_nodes` declares it lost once the streak is older than TTL + grace
//! ([`Scheduler::failing_too_long`]). The streak ends when a report is delivered, or when a
//! session stays up longer than the node TTL without failing (one transient error does not
//! make a healthy idle node lost).

use super::Scheduler;
use std::time::Instant;

/// The longest error text kept per node.
const MAX_ERROR_CHARS: usize = 500;

/// What the scheduler knows of one node's recent sessions.
#[derive(Debug, Default)]
pub(super) struct Delivery {
    /// The error that ended its last session, until it delivers a report.
    error: Option<String>,
    /// The first session error since it last delivered (or last held a session past the TTL).
    failing_since: Option<Instant>,
    /// The last session error.
    last_failure: Option<Instant>,
    /// When its current (or last) session started.
    session_start: Option<Instant>,
}

impl<S> Scheduler<S> {
    fn with_delivery<T>(&self, node_id: &str, f: impl FnOnce(&mut Delivery) -> T) -> T {
        let mut all = self
            .delivery_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(all.entry(node_id.to_owned()).or_default())
    }

    /// Whether the session that started at `session_start` has outlived the node TTL since
    /// the last failure without failing itself: the failure streak is over.
    fn streak_over(&self, d: &Delivery, now: Instant) -> bool {
        match (d.session_start, d.last_failure) {
            (Some(start), Some(failed)) => {
                start >= failed && now.saturating_duration_since(start) > self.config.node_ttl
            }
            _ => false,
        }
    }

    /// Records that a session of `node_id` started at `at` (it registered).
    pub(super) fn session_started(&self, node_id: &str, at: Instant) {
        self.with_delivery(node_id, |d| d.session_start = Some(at));
    }

    /// Records that `node_id`'s session ended at `at` because of `error` (a message that could
    /// not be read or handled), so the node's view shows why it keeps reconnecting, and the
    /// node's failure streak goes on (or starts).
    pub fn record_delivery_error(&self, node_id: &str, error: &str, at: Instant) {
        let text: String = error.chars().take(MAX_ERROR_CHARS).collect();
        self.with_delivery(node_id, |d| {
            if d.failing_since.is_none() || self.streak_over(d, at) {
                d.failing_since = Some(at);
            }
            d.last_failure = Some(at);
            d.error = Some(text);
        });
    }

    /// `node_id` delivered a report: the last session error is history, and so is its streak.
    pub fn clear_delivery_error(&self, node_id: &str) {
        let mut all = self
            .delivery_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(d) = all.get_mut(node_id) {
            d.error = None;
            d.failing_since = None;
        }
    }

    /// Forgets `node_id`'s sessions (a removed node).
    pub(super) fn forget_delivery(&self, node_id: &str) {
        self.delivery_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node_id);
    }

    /// The error that ended `node_id`'s last session, unless it delivered a report since.
    pub fn delivery_error(&self, node_id: &str) -> Option<String> {
        self.delivery_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node_id)
            .and_then(|d| d.error.clone())
    }

    /// Since when `node_id`'s sessions have kept failing at `now`, if they have for longer
    /// than TTL + grace: such a node cannot deliver and is declared lost.
    pub(super) fn failing_too_long(&self, node_id: &str, now: Instant) -> Option<Instant> {
        let limit = self.config.node_ttl + self.config.lost_grace;
        let all = self
            .delivery_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let d = all.get(node_id)?;
        let since = d.failing_since?;
        if self.streak_over(d, now) || now.saturating_duration_since(since) <= limit {
            return None;
        }
        Some(since)
    }
}
