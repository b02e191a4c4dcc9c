//! What one client may hold of the API: the connection limits [`crate::serve_with`] enforces
//! ([`ServeLimits`], flags of `berth-api`), and the per-key cap on concurrent log streams
//! ([`StreamGauge`]).

use crate::error::ApiError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The API's defences against clients that hold resources without using them.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// Open connections at most. At the cap a new connection closes the connection that has
    /// been idle longest (no request in flight), so idle or slow clients cannot lock others out;
    /// with every connection busy, the new one is closed at once.
    pub max_connections: usize,
    /// From a connection's start, or the end of its previous response, until the request head
    /// (line and headers) is complete: bounds slow headers and idle keep-alive alike.
    pub header_read_timeout: Duration,
    /// How long a request body may take to arrive, whole (answered 408, connection closed).
    pub body_read_timeout: Duration,
    /// How long shutdown waits for requests in flight (log streams) before closing them.
    pub shutdown_grace: Duration,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_STREAMS_PER_KEY: usize = 32;

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Counts the open log streams of each key, up to a cap.
#[derive(Debug)]
pub struct StreamGauge {
    max_per_key: usize,
    open: Mutex<HashMap<String, usize>>,
}

impl StreamGauge {
    pub fn new(max_per_key: usize) -> Arc<StreamGauge> {
        Arc::new(StreamGauge {
            max_per_key,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// One more stream for `key`, or 429 when it holds `max_per_key` already. The stream
    /// counts until the permit is dropped (with the response body).
    pub fn acquire(self: &Arc<Self>, key: &str) -> Result<StreamPermit, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key.to_owned()).or_insert(0);
        if *n >= self.max_per_key {
            return Err(ApiError::TooManyRequests {
                field: "authorization".to_owned(),
                message: format!(
                    "this API key has {} log streams open, the most allowed; close one first",
                    self.max_per_key
                ),
            });
        }
        *n += 1;
        metrics::gauge!(crate::metrics::SSE_STREAMS_OPEN).increment(1.0);
        Ok(StreamPermit {
            gauge: self.clone(),
            key: key.to_owned(),
        })
    }

    pub fn open_streams(&self, key: &str) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(key).copied().unwrap_or(0)
    }
}

/// One open stream of a key; released on drop.
#[derive(Debug)]
pub struct StreamPermit {
    gauge: Arc<StreamGauge>,
    key: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::SSE_STREAMS_OPEN).decrement(1.0);
        let mut open = self.gauge.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_holds_at_most_its_cap_and_dropping_frees_a_place() {
        let gauge = StreamGauge::new(2);
        let a1 = gauge.acquire("a").expect("first");
        let _a2 = gauge.acquire("a").expect("second");
        assert!(matches!(
            gauge.acquire("a"),
            Err(ApiError::TooManyRequests { .. })
        ));
        let _b1 = gauge.acquire("b").expect("another key has its own cap");
        drop(a1);
        assert_eq!(gauge.open_streams("a"), 1);
        let _a3 = gauge.acquire("a").expect("a place was freed");
    }
}
