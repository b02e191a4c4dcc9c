//! The accept loop: HTTP/1.1 connections driven by hyper with the API's limits
//! ([`ServeLimits`]): a header read timeout (also the idle keep-alive timeout), a body read
//! timeout (enforced where the body is read, [`crate::body::JsonBody`]), and a connection cap.
//!
//! The cap never locks out a new client: at the cap, the connection that has been idle longest
//! (no request in flight, e.g. one of a flood of idle or slow-header sockets) is closed to make
//! room. A flood would have to open `max_connections` connections within one client's round
//! trip to push that client out before it sends its request.

use crate::body::BodyReadTimeout;
use crate::limits::ServeLimits;
use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower::ServiceExt;

/// Serves `app` on `listener` until `shutdown` resolves, then lets requests in flight finish
/// for `limits.shutdown_grace`.
pub async fn run(
    app: Router,
    listener: TcpListener,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let table = Arc::new(ConnectionTable::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let body_timeout = BodyReadTimeout(limits.body_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                // Out of file descriptors (or a connection reset while queued): back off
                // briefly instead of spinning; the connections we hold time out and free some.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some((slot, evicted)) = table.admit() else {
            tracing::warn!(
                max_connections = limits.max_connections,
                "connection refused: every connection is busy"
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let activity = slot.activity.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let busy = Busy::begin(&activity);
            req.extensions_mut().insert(body_timeout);
            let app = app.clone();
            async move {
                let res = app.oneshot(req.map(Body::new)).await;
                res.map(|res| res.map(|body| Body::new(TrackedBody { body, _busy: busy })))
            }
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            tokio::select! {
                result = conn => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended");
                    }
                }
                // Dropping the connection closes its socket.
                _ = evicted => tracing::debug!("idle connection closed to admit a new one"),
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!(grace = ?limits.shutdown_grace, "closing connections still open");
    }
    Ok(())
}

/// What a connection is doing, read when choosing whom to close at the cap.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since the table's epoch when the last request ended (or the connection
    /// opened).
    idle_since_ms: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A request in flight on its connection, until its response body is dropped.
struct Busy(Arc<Activity>);

impl Busy {
    fn begin(activity: &Arc<Activity>) -> Busy {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0
            .idle_since_ms
            .store(self.0.now_ms(), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its connection marked busy until it is sent (or dropped): a log
/// stream is a request in flight for as long as it lasts.
struct TrackedBody {
    body: Body,
    _busy: Busy,
}

impl hyper::body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The open connections, up to a cap.
struct ConnectionTable {
    max: usize,
    epoch: Instant,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    /// Each connection's activity and the sender whose drop closes it.
    conns: HashMap<u64, (Arc<Activity>, oneshot::Sender<()>)>,
}

/// A connection's place in the table, released on drop.
struct Slot {
    id: u64,
    activity: Arc<Activity>,
    table: Arc<ConnectionTable>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.lock().conns.remove(&self.id);
    }
}

impl ConnectionTable {
    fn new(max: usize) -> ConnectionTable {
        ConnectionTable {
            max: max.max(1),
            epoch: Instant::now(),
            open: Mutex::new(Open::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new connection, closing the longest-idle one at the cap; `None` when every
    /// connection has a request in flight. The receiver resolves when the connection must close.
    fn admit(self: &Arc<Self>) -> Option<(Slot, oneshot::Receiver<()>)> {
        let mut open = self.lock();
        if open.conns.len() >= self.max {
            let victim = open
                .conns
                .iter()
                .filter(|(_, (a, _))| a.in_flight.load(Ordering::SeqCst) == 0)
                .min_by_key(|(_, (a, _))| a.idle_since_ms.load(Ordering::SeqCst))
                .map(|(id, _)| *id)?;
            // Dropping its sender wakes the connection's task, which closes it.
            open.conns.remove(&victim);
        }
        let id = open.next_id;
        open.next_id += 1;
        let activity = Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            epoch: self.epoch,
        });
        activity
            .idle_since_ms
            .store(activity.now_ms(), Ordering::SeqCst);
        let (close, closed) = oneshot::channel();
        open.conns.insert(id, (activity.clone(), close));
        Some((
            Slot {
                id,
                activity,
                table: self.clone(),
            },
            closed,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_longest_idle_connection_makes_room_and_busy_ones_stay() {
        let table = Arc::new(ConnectionTable::new(2));
        let (first, mut first_closed) = table.admit().expect("room");
        let (second, mut second_closed) = table.admit().expect("room");
        let busy = Busy::begin(&second.activity);
        let (_third, _) = table.admit().expect("the idle first makes room");
        assert!(
            first_closed.try_recv().is_err(),
            "the first was told to close"
        );
        assert_eq!(
            second_closed.try_recv(),
            Err(oneshot::error::TryRecvError::Empty),
            "the busy one stays"
        );
        drop(first);
        // The third is idle now: it makes room for a fourth; the busy second still stays.
        let (_fourth, _) = table.admit().expect("the idle third makes room");
        assert_eq!(
            second_closed.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        drop(busy);
        drop(second);
    }

    #[test]
    fn with_every_connection_busy_a_new_one_is_refused() {
        let table = Arc::new(ConnectionTable::new(1));
        let (only, _closed) = table.admit().expect("room");
        let _busy = Busy::begin(&only.activity);
        assert!(table.admit().is_none());
    }
}
