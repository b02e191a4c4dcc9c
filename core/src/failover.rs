//! Reaching the scheduler when several run and only the leader listens.
//!
//! The API and the node agents are given every scheduler address (`--scheduler
//! http://10.0.0.1:7070,http://10.0.0.2:7070`, one address stays valid). A standby does not listen
//! until it wins the election, so "connection refused" means "not the leader (now)", and a deposed
//! leader exits. Each client keeps using the address that last worked and, when it stops working,
//! walks the list: the next address at once, and after a whole round without success a short
//! backoff ([`Rotation`]). The backoff stays at most [`ROUND_BACKOFF_MAX`], so a new leader is
//! found within about that long of starting to listen, however long the failover took.
//!
//! A leader frozen by SIGSTOP (or cut off) still completes TCP handshakes from its listen backlog
//! and keeps open connections, but answers nothing: only an HTTP/2 PING tells. Every channel made
//! here pings after [`KEEPALIVE_INTERVAL`] of silence and gives the connection up when no answer
//! comes within [`KEEPALIVE_TIMEOUT`], so a frozen scheduler costs at most about three seconds.
//!
//! - [`SchedulerAddrs`]: the parsed list, and the [`Endpoint`] settings every client uses.
//! - [`Rotation`]: which address next and how long to wait first; pure, no I/O.
//! - [`FailoverChannel`]: a tonic transport over one lazy channel per address for unary and
//!   server-streaming calls (the API's): a call that certainly never left (connect refused or
//!   timed out) goes to the next address; one that may have reached a scheduler is sent again
//!   only if the caller's policy says it is a read; all within a time budget.
//!
//! A bidirectional session (the agent's `Attach`) cannot be re-sent call by call: the agent
//! walks the list with a [`Rotation`] and registers again with whichever scheduler answers.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use http_body_util::BodyExt as _;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt as _;

/// How long a TCP connect may take. Loopback and LAN connects to a live port take well under a
/// millisecond and a port nobody listens on is refused at once, so this only matters for a
/// machine that is gone (no reset comes back); a SYN lost to a full backlog is retransmitted
/// after 1 s, so 2 s still lets an overloaded leader be reached.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// An HTTP/2 PING after this long without a frame from the scheduler. One PING a second per
/// connection is a few dozen bytes: nothing for the scheduler, and with [`KEEPALIVE_TIMEOUT`] a
/// frozen scheduler is given up within 3 s (the etcd lease the leader holds lasts longer, so
/// the clients are looking for the new leader by the time it takes over).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long an unanswered PING may wait. The PING is answered by the scheduler's HTTP/2
/// connection task, not by its request handlers, so a scheduler that is merely busy answers it
/// in milliseconds; 2 s is far beyond any pause of a live process.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 flow-control windows of every gRPC connection, client and server side. The protocol's
/// default (64 KiB) makes a sender stop for a window update every 64 KiB: an agent's 1 MiB log
/// batch waited for sixteen of them, and a run writing fast was stored at a third of the speed
/// the scheduler can store it. The windows bound what one peer buffers unread.
pub const HTTP2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const HTTP2_CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// The first wait after a whole round of addresses failed; it doubles up to
/// [`ROUND_BACKOFF_MAX`] (jittered, so a fleet of agents does not come back in step).
pub const ROUND_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// The longest wait between two rounds: a new leader is tried within this long of listening.
pub const ROUND_BACKOFF_MAX: Duration = Duration::from_millis(200);

/// Why a list of scheduler addresses is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrsError {
    /// The list names no address.
    #[error("no scheduler address given")]
    Empty,
    /// One address is not an `http(s)://host:port` URL.
    #[error(
        "invalid scheduler address {0:?}: expected https://host:port (or http:// on loopback)"
    )]
    Invalid(String),
    /// The same address twice would only make every round longer.
    #[error("scheduler address {0} is listed twice")]
    Duplicate(String),
}

/// The scheduler addresses a client was given, in the order given (at least one, no duplicate),
/// and the CA certificate (PEM) that `https://` addresses are verified against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerAddrs(Vec<String>, Option<Arc<[u8]>>);

impl SchedulerAddrs {
    /// A comma-separated list of URLs (`http://a:7070,http://b:7070`); spaces around commas are
    /// allowed, one URL alone is a list of one.
    pub fn parse(list: &str) -> Result<SchedulerAddrs, AddrsError> {
        let mut urls: Vec<String> = Vec::new();
        for url in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let uri: http::Uri = url.parse().map_err(|_| AddrsError::Invalid(url.into()))?;
            let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
            if !scheme_ok || uri.authority().is_none() {
                return Err(AddrsError::Invalid(url.into()));
            }
            if urls.iter().any(|u| u == url) {
                return Err(AddrsError::Duplicate(url.into()));
            }
            urls.push(url.to_owned());
        }
        if urls.is_empty() {
            return Err(AddrsError::Empty);
        }
        Ok(SchedulerAddrs(urls, None))
    }

    pub fn urls(&self) -> &[String] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true: a list holds at least one address.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Trusts the CA certificate `ca_pem` (PEM) for `https://` addresses.
    pub fn with_ca(mut self, ca_pem: Vec<u8>) -> SchedulerAddrs {
        self.1 = Some(ca_pem.into());
        self
    }

    /// Checks the transport each address will use (see [`crate::tls`]): `https://` needs a CA
    /// to verify the scheduler with, and plaintext `http://` is for loopback only.
    pub fn check_transport(&self) -> Result<(), crate::tls::TlsError> {
        for url in &self.0 {
            let uri: http::Uri = url
                .parse()
                .map_err(|_| crate::tls::TlsError::Address(url.clone()))?;
            match uri.scheme_str() {
                Some("https") if self.1.is_none() => {
                    return Err(crate::tls::TlsError::NoCa(url.clone()))
                }
                Some("http") if !crate::tls::is_loopback_host(uri.host().unwrap_or_default()) => {
                    return Err(crate::tls::TlsError::PlaintextBeyondLoopback(url.clone()))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The endpoint of address `i` with the settings every client uses: the connect timeout,
    /// the HTTP/2 keepalive that notices a frozen scheduler (also while no call is open), and
    /// for `https://` TLS verified against the configured CA (the name checked is the URL's host).
    pub fn endpoint(&self, i: usize) -> Endpoint {
        let url = &self.0[i % self.0.len()];
        // Checked by `parse`: a URI with a scheme and an authority is a valid endpoint.
        let endpoint = Endpoint::from_shared(url.clone())
            .unwrap_or_else(|_| Endpoint::from_static("http://127.0.0.1:7070"))
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        match (url.starts_with("https://"), &self.1) {
            // Without a usable TLS configuration the endpoint stays without one, and tonic
            // refuses to connect to an https:// address that way: it fails closed.
            (true, Some(ca)) => {
                let tls = crate::tls::client_config(ca);
                endpoint.clone().tls_config(tls).unwrap_or(endpoint)
            }
            _ => endpoint,
        }
    }
}

impl std::str::FromStr for SchedulerAddrs {
    type Err = AddrsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SchedulerAddrs::parse(s)
    }
}

impl std::fmt::Display for SchedulerAddrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// Walks a list of `len` addresses from `start`: after a failure the next address at once;
/// after a whole round of failures a wait of [`ROUND_BACKOFF_MIN`] doubling to
/// [`ROUND_BACKOFF_MAX`] (jitter included); a success resets both.
#[derive(Debug)]
pub struct Rotation {
    len: usize,
    current: usize,
    failed_in_round: usize,
    backoff: ExponentialBackoff,
}

fn round_backoff() -> ExponentialBackoff {
    // Jitter adds up to 100 % of the delay: doubling stops at half the cap.
    ExponentialBuilder::default()
        .with_min_delay(ROUND_BACKOFF_MIN)
        .with_max_delay(ROUND_BACKOFF_MAX / 2)
        .with_jitter()
        .without_max_times()
        .build()
}

impl Rotation {
    pub fn new(len: usize, start: usize) -> Rotation {
        let len = len.max(1);
        Rotation {
            len,
            current: start % len,
            failed_in_round: 0,
            backoff: round_backoff(),
        }
    }

    /// The address to try now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The current address worked: stay on it, and the next outage starts a fresh round.
    pub fn worked(&mut self) {
        self.failed_in_round = 0;
        self.backoff = round_backoff();
    }

    /// The current address failed: moves to the next and says how long to wait before trying
    /// it (zero within a round).
    pub fn failed(&mut self) -> Duration {
        self.current = (self.current + 1) % self.len;
        self.failed_in_round += 1;
        if self.failed_in_round < self.len {
            return Duration::ZERO;
        }
        self.failed_in_round = 0;
        self.backoff
            .next()
            .unwrap_or(ROUND_BACKOFF_MAX)
            .min(ROUND_BACKOFF_MAX)
    }

    /// How many addresses of the current round have failed so far.
    pub fn failed_in_round(&self) -> usize {
        self.failed_in_round
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether an error of a call means the request never left this process: connecting failed
/// (refused, timed out, unreachable). Anything else (the connection broke, a PING went
/// unanswered) may have come after the scheduler read the request.
pub fn never_sent(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// How a [`FailoverChannel`] treats calls.
#[derive(Debug, Clone, Copy)]
pub struct FailoverPolicy {
    /// A call is given up (with its last error) once failing over has taken this long; the
    /// first attempt alone is not limited, so a slow answer is never cut.
    pub budget: Duration,
    /// Whether the call with this gRPC path (`/package.Service/Method`) only reads: a read is
    /// sent again after an ambiguous failure, a write only after one that never left.
    pub is_read: fn(&str) -> bool,
}

struct Shared {
    addrs: SchedulerAddrs,
    channels: Vec<Channel>,
    preferred: AtomicUsize,
    policy: FailoverPolicy,
}

/// A tonic transport over every scheduler address, for unary and server-streaming calls: each
/// call goes to the address that last answered; see the module doc for when it moves on.
/// Cloning is cheap and clones share the choice of address.
#[derive(Clone)]
pub struct FailoverChannel(Arc<Shared>);

impl FailoverChannel {
    /// One lazy channel per address: nothing connects until the first call, so a client starts
    /// (and answers 503) while no scheduler is up. Must be called inside a Tokio runtime.
    pub fn new(addrs: &SchedulerAddrs, policy: FailoverPolicy) -> FailoverChannel {
        let channels = (0..addrs.len())
            .map(|i| addrs.endpoint(i).connect_lazy())
            .collect();
        FailoverChannel(Arc::new(Shared {
            addrs: addrs.clone(),
            channels,
            preferred: AtomicUsize::new(0),
            policy,
        }))
    }

    /// The address calls go to now.
    pub fn preferred_url(&self) -> &str {
        let i = self.0.preferred.load(Ordering::Relaxed);
        &self.0.addrs.urls()[i % self.0.addrs.len()]
    }

    fn worked(&self, i: usize) {
        let before = self.0.preferred.swap(i, Ordering::Relaxed);
        if before != i {
            tracing::info!(scheduler = %self.0.addrs.urls()[i], "scheduler calls go to this address now");
        }
    }

    /// Moves the preferred address on, unless a concurrent call already did.
    fn failed(&self, i: usize) {
        let next = (i + 1) % self.0.addrs.len();
        let _ = self
            .0
            .preferred
            .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    async fn send(self, req: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        let (parts, body) = req.into_parts();
        // Unary and server-streaming requests are one message: keep it to send it again.
        let payload = body.collect().await?.to_bytes();
        let read = (self.0.policy.is_read)(parts.uri.path());
        let started = tokio::time::Instant::now();
        let deadline = started + self.0.policy.budget;
        let start = self.0.preferred.load(Ordering::Relaxed);
        let mut rotation = Rotation::new(self.0.addrs.len(), start);
        let mut first = true;
        loop {
            let i = rotation.current();
            let body = Body::new(http_body_util::Full::new(payload.clone()));
            let attempt = http::Request::from_parts(parts.clone(), body);
            let call = self.0.channels[i].clone().oneshot(attempt);
            let result = if first {
                call.await.map_err(BoxError::from)
            } else {
                match tokio::time::timeout_at(deadline, call).await {
                    Ok(r) => r.map_err(BoxError::from),
                    Err(_) => Err(BoxError::from(tonic::TimeoutExpired(()))),
                }
            };
            first = false;
            let outcome = match result {
                Ok(res) if !answered_unavailable(&res) => {
                    self.worked(i);
                    return Ok(res);
                }
                Ok(res) => Attempt::Unavailable(res),
                Err(e) if never_sent(&*e) => Attempt::NeverSent(e),
                Err(e) => Attempt::Ambiguous(e),
            };
            self.failed(i);
            let retry = read
                || match &outcome {
                    Attempt::NeverSent(_) => true,
                    Attempt::Unavailable(res) => not_served(res),
                    Attempt::Ambiguous(_) => false,
                };
            let delay = rotation.failed();
            let now = tokio::time::Instant::now();
            tracing::debug!(
                scheduler = %self.0.addrs.urls()[i],
                path = parts.uri.path(),
                read,
                outcome = outcome.describe(),
                "scheduler call failed"
            );
            if !retry || now + delay >= deadline {
                if retry {
                    tracing::warn!(
                        path = parts.uri.path(),
                        elapsed_ms = u64::try_from(now.duration_since(started).as_millis())
                            .unwrap_or(u64::MAX),
                        "no scheduler answered within the failover budget"
                    );
                }
                return outcome.into_result();
            }
            tokio::time::sleep(delay).await;
        }
    }
}

/// What one attempt of a call came to, short of success.
enum Attempt {
    /// The scheduler answered `UNAVAILABLE` itself.
    Unavailable(http::Response<Body>),
    NeverSent(BoxError),
    Ambiguous(BoxError),
}

impl Attempt {
    fn describe(&self) -> &'static str {
        match self {
            Attempt::Unavailable(_) => "answered unavailable",
            Attempt::NeverSent(_) => "never sent",
            Attempt::Ambiguous(_) => "may have been received",
        }
    }

    fn into_result(self) -> Result<http::Response<Body>, BoxError> {
        match self {
            Attempt::Unavailable(res) => Ok(res),
            Attempt::NeverSent(e) | Attempt::Ambiguous(e) => Err(e),
        }
    }
}

/// Response metadata on an `UNAVAILABLE` answer meaning the scheduler refused the call before
/// handling it (it cannot confirm its leadership right now): a write may be sent again.
pub const NOT_SERVED_METADATA: &str = "x-berth-not-served";

fn not_served(res: &http::Response<Body>) -> bool {
    res.headers().contains_key(NOT_SERVED_METADATA)
}

/// A trailers-only answer with `grpc-status: 14`: the scheduler refused the call for now.
fn answered_unavailable(res: &http::Response<Body>) -> bool {
    res.headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"14")
}

impl tower::Service<http::Request<Body>> for FailoverChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call readies the channel it picks.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}

#[cfg(test)]
mod tests;
