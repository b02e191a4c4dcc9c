//! Why a node's agent sessions fail, for the node's view: the error that ended its last session,
//! kept until the node next delivers a report. Memory only, like liveness, and outside the
//! engine's lock so recording it never waits for the engine.

use super::Scheduler;

/// The longest error text kept per node.
const MAX_ERROR_CHARS: usize = 500;

impl<S> Scheduler<S> {
    /// Records that `node_id`'s session ended because of `error` (a message that could not be
    /// read or handled), so the node's view shows why it keeps reconnecting.
    pub fn record_delivery_error(&self, node_id: &str, error: &str) {
        let text: String = error.chars().take(MAX_ERROR_CHARS).collect();
        self.delivery_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node_id.to_owned(), text);
    }

    /// `node_id` delivered a report: the last session error is history.
    pub fn clear_delivery_error(&self, node_id: &str) {
        let mut errors = self
            .delivery_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !errors.is_empty() {
            errors.remove(node_id);
        }
    }

    /// The error that ended `node_id`'s last session, unless it delivered a report since.
    pub fn delivery_error(&self, node_id: &str) -> Option<String> {
        self.delivery_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node_id)
            .cloned()
    }
}
