use super::*;
use std::convert::Infallible;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

#[test]
fn a_list_of_addresses_parses_and_one_address_stays_valid() {
    let one = SchedulerAddrs::parse("http://127.0.0.1:7070").expect("one");
    assert_eq!(one.urls(), ["http://127.0.0.1:7070"]);
    let two = SchedulerAddrs::parse(" http://a:7070 , http://b:7071,").expect("two");
    assert_eq!(two.urls(), ["http://a:7070", "http://b:7071"]);
    assert_eq!(two.to_string(), "http://a:7070,http://b:7071");
    assert_eq!(SchedulerAddrs::parse(" , "), Err(AddrsError::Empty));
    assert_eq!(
        SchedulerAddrs::parse("http://a:1,a:2"),
        Err(AddrsError::Invalid("a:2".into()))
    );
    assert_eq!(
        SchedulerAddrs::parse("ftp://a:1"),
        Err(AddrsError::Invalid("ftp://a:1".into()))
    );
    assert_eq!(
        SchedulerAddrs::parse("http://a:1,http://a:1"),
        Err(AddrsError::Duplicate("http://a:1".into()))
    );
}

#[test]
fn a_rotation_walks_the_list_and_waits_only_after_a_whole_round() {
    let mut r = Rotation::new(3, 1);
    assert_eq!(r.current(), 1);
    assert_eq!(r.failed(), Duration::ZERO);
    assert_eq!(r.current(), 2);
    assert_eq!(r.failed(), Duration::ZERO);
    assert_eq!(r.current(), 0);
    let wait = r.failed();
    assert_eq!(r.current(), 1, "a new round starts where the last one did");
    assert!(
        (ROUND_BACKOFF_MIN..=ROUND_BACKOFF_MAX).contains(&wait),
        "{wait:?}"
    );
    // Many rounds later the wait is still capped.
    for _ in 0..100 {
        let wait = r.failed();
        assert!(wait <= ROUND_BACKOFF_MAX, "{wait:?}");
    }
    // A success resets the round: the next failure moves on at once.
    r.worked();
    let at = r.current();
    assert_eq!(r.failed(), Duration::ZERO);
    assert_eq!(r.current(), (at + 1) % 3);
}

#[test]
fn a_rotation_over_one_address_waits_after_every_failure() {
    let mut r = Rotation::new(1, 0);
    for _ in 0..20 {
        let wait = r.failed();
        assert_eq!(r.current(), 0);
        assert!(
            (ROUND_BACKOFF_MIN..=ROUND_BACKOFF_MAX).contains(&wait),
            "{wait:?}"
        );
    }
}

#[test]
fn round_waits_are_jittered_so_a_fleet_does_not_retry_in_step() {
    let mut r = Rotation::new(1, 0);
    let waits: Vec<Duration> = (0..20).map(|_| r.failed()).collect();
    let tail = &waits[5..];
    assert!(tail.iter().any(|w| w != &tail[0]), "{tail:?}");
}

/// A stand-in for a scheduler: answers every call `OK` (or `UNAVAILABLE`, with `refusal`) and
/// says who it is.
#[derive(Clone)]
struct Fake {
    name: &'static str,
    calls: Arc<AtomicUsize>,
    refusal: Option<bool>,
}

impl tonic::server::NamedService for Fake {
    const NAME: &'static str = "test.Fake";
}

impl tower::Service<http::Request<Body>> for Fake {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: http::Request<Body>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut res = http::Response::new(Body::empty());
        let headers = res.headers_mut();
        headers.insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        match self.refusal {
            None => {
                headers.insert("grpc-status", http::HeaderValue::from_static("0"));
            }
            Some(not_served) => {
                headers.insert("grpc-status", http::HeaderValue::from_static("14"));
                if not_served {
                    headers.insert(NOT_SERVED_METADATA, http::HeaderValue::from_static("test"));
                }
            }
        }
        headers.insert("x-served-by", http::HeaderValue::from_static(self.name));
        std::future::ready(Ok(res))
    }
}

/// Serves a [`Fake`] on a loopback port; returns its URL and its call counter.
async fn serve_fake(name: &'static str) -> (String, Arc<AtomicUsize>) {
    serve_fake_refusing(name, None).await
}

/// A [`Fake`] that answers `UNAVAILABLE` when `refusal` is set (marked as not served when it
/// is `Some(true)`).
async fn serve_fake_refusing(
    name: &'static str,
    refusal: Option<bool>,
) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let calls = Arc::new(AtomicUsize::new(0));
    let fake = Fake {
        name,
        calls: calls.clone(),
        refusal,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(fake)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (url, calls)
}

/// `n` distinct loopback ports nobody listens on (connect is refused). All are bound before
/// any is let go, so the system cannot hand the same port out twice.
async fn refused_urls(n: usize) -> Vec<String> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
        );
    }
    held.iter()
        .map(|l| format!("http://{}", l.local_addr().expect("addr")))
        .collect()
}

/// A loopback port nobody listens on.
async fn refused_url() -> String {
    refused_urls(1).await.remove(0)
}

/// A port that accepts connections and then never reads or answers: a frozen process.
async fn frozen_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    url
}

/// A port that accepts connections and closes each at once: the call may have been received.
async fn slamming_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            // Read the request, so the client has sent it, then close.
            let _ = socket.readable().await;
            drop(socket);
        }
    });
    url
}

fn is_read(path: &str) -> bool {
    path.ends_with("/Get")
}

fn channel(urls: &[String], budget: Duration) -> FailoverChannel {
    let addrs = SchedulerAddrs::parse(&urls.join(",")).expect("addrs");
    FailoverChannel::new(&addrs, FailoverPolicy { budget, is_read })
}

async fn call(ch: &FailoverChannel, method: &str) -> Result<http::Response<Body>, BoxError> {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://scheduler/test.Fake/{method}"))
        .header("content-type", "application/grpc")
        .body(Body::new(http_body_util::Full::new(bytes_of(
            b"\0\0\0\0\0",
        ))))
        .expect("request");
    ch.clone().oneshot(req).await
}

fn bytes_of(b: &'static [u8]) -> tonic::codegen::Bytes {
    tonic::codegen::Bytes::from_static(b)
}

fn served_by(res: &http::Response<Body>) -> &str {
    res.headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test]
async fn a_write_that_never_left_goes_to_the_next_address_which_is_then_kept() {
    let (b, b_calls) = serve_fake("b").await;
    let ch = channel(&[refused_url().await, b.clone()], Duration::from_secs(5));
    let res = call(&ch, "Create").await.expect("answered by b");
    assert_eq!(served_by(&res), "b");
    assert_eq!(ch.preferred_url(), b);
    // The next call goes straight to b.
    let res = call(&ch, "Create").await.expect("answered by b");
    assert_eq!(served_by(&res), "b");
    assert_eq!(b_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_write_that_may_have_been_received_is_not_sent_again_but_a_read_is() {
    let (b, b_calls) = serve_fake("b").await;
    let ch = channel(&[slamming_url().await, b], Duration::from_secs(5));
    let err = call(&ch, "Create").await.expect_err("no second attempt");
    assert!(!never_sent(&*err), "{err}");
    assert_eq!(
        b_calls.load(Ordering::SeqCst),
        0,
        "the write was sent again"
    );

    let ch = channel(
        &[slamming_url().await, serve_fake("c").await.0],
        Duration::from_secs(5),
    );
    let res = call(&ch, "Get").await.expect("the read is sent again");
    assert_eq!(served_by(&res), "c");
}

/// A scheduler that refuses a call before handling it (it cannot confirm its leadership) says
/// so, and only then is a write sent again; a plain `UNAVAILABLE` may have been acted on.
#[tokio::test]
async fn a_write_refused_as_not_served_is_sent_again_and_a_plain_unavailable_is_not() {
    let (paused, paused_calls) = serve_fake_refusing("paused", Some(true)).await;
    let (b, _) = serve_fake("b").await;
    let ch = channel(&[paused, b.clone()], Duration::from_secs(5));
    let res = call(&ch, "Create").await.expect("answered");
    assert_eq!(served_by(&res), "b");
    assert_eq!(paused_calls.load(Ordering::SeqCst), 1);

    let (failing, _) = serve_fake_refusing("failing", Some(false)).await;
    let (c, c_calls) = serve_fake("c").await;
    let ch = channel(&[failing, c], Duration::from_secs(5));
    let res = call(&ch, "Create").await.expect("answered");
    assert_eq!(
        served_by(&res),
        "failing",
        "the UNAVAILABLE answer is returned"
    );
    assert_eq!(
        c_calls.load(Ordering::SeqCst),
        0,
        "the write was sent again"
    );
}

#[tokio::test]
async fn a_frozen_scheduler_is_given_up_by_its_keepalive() {
    let (b, _) = serve_fake("b").await;
    let ch = channel(&[frozen_url().await, b], Duration::from_secs(10));
    let started = Instant::now();
    // Bounded: the keepalive gives up within interval + timeout; 15 s means it never did.
    let res = tokio::time::timeout(Duration::from_secs(15), call(&ch, "Get"))
        .await
        .expect("the frozen scheduler was never given up")
        .expect("answered by b");
    assert_eq!(served_by(&res), "b");
    eprintln!("moved past a frozen scheduler in {:?}", started.elapsed());
}

#[tokio::test]
async fn with_no_scheduler_up_a_call_fails_once_the_budget_is_spent() {
    let ch = channel(&refused_urls(2).await, Duration::from_millis(400));
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), call(&ch, "Create"))
        .await
        .expect("bounded")
        .expect_err("nobody listens");
    assert!(never_sent(&*err), "{err}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(200), "gave up after {took:?}");
    assert_eq!(
        tonic::Status::from_error(err).code(),
        tonic::Code::Unavailable
    );
}

#[tokio::test]
async fn a_scheduler_that_starts_listening_later_is_found_within_a_round_backoff() {
    let urls = refused_urls(2).await;
    let late = urls[1].clone();
    let ch = channel(&urls, Duration::from_secs(5));
    let pending = tokio::spawn({
        let ch = ch.clone();
        async move { call(&ch, "Create").await.map(|r| served_by(&r).to_owned()) }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Takes the freed port again (nobody else binds loopback ports this quickly here).
    let listener = tokio::net::TcpListener::bind(late.trim_start_matches("http://"))
        .await
        .expect("rebind");
    let calls = Arc::new(AtomicUsize::new(0));
    let fake = Fake {
        name: "late",
        calls: calls.clone(),
        refusal: None,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(fake)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let served = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("bounded")
        .expect("joined")
        .expect("answered once it listens");
    assert_eq!(served, "late");
    assert_eq!(ch.preferred_url(), late);
}
