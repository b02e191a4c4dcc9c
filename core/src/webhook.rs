//! Run-ended webhooks (issue #15): a runner's `notify_url` receives a signed JSON event when one
//! of its runs ends. This module is the plain data and the pure parts: the runner's [`Notify`]
//! settings and their checks, the event's body, the signature, the retry schedule and the
//! [`Delivery`] record the scheduler keeps per ended run.
//!
//! # The request
//! `POST notify_url` with `Content-Type: application/json`, the body [`event_body`], and:
//! - `Berth-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`: a receiver
//!   recomputes it over the raw body with its secret and refuses a stale `t` (replays);
//! - `Berth-Event-Id: <run id>`: the same on every attempt; deliveries are at least once (a
//!   failover may repeat one), so receivers dedupe on it;
//! - `Berth-Delivery-Attempt: <n>`.
//!
//! Any 2xx answer delivers it. Anything else (another status, no answer within the timeout, a
//! refused connection) is tried again after [`backoff_millis`], up to [`MAX_ATTEMPTS`] attempts
//! in all (about 6 hours), then the delivery is `failed`.

use crate::model::Run;
use crate::validate::Collector;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Attempts in all before a delivery is given up.
pub const MAX_ATTEMPTS: u32 = 12;
/// The wait after the first failed attempt; each later one is 4 times longer, at most
/// [`MAX_BACKOFF_MILLIS`].
pub const FIRST_BACKOFF_MILLIS: i64 = 1_000;
pub const MAX_BACKOFF_MILLIS: i64 = 3_600_000;
/// How long one attempt may take, connecting included.
pub const ATTEMPT_TIMEOUT_MILLIS: u64 = 10_000;
pub const URL_MAX: usize = 2048;
pub const SECRET_MIN: usize = 16;
pub const SECRET_MAX: usize = 256;
/// Attempts kept in a delivery's record (the first ones and the latest).
const ATTEMPTS_KEPT: usize = MAX_ATTEMPTS as usize;

/// Where a runner's run-ended events go, and the secret that signs them (write-only: never
/// shown by the API).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    pub url: String,
    pub secret: String,
}

impl std::fmt::Debug for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notify")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Checks a notify URL: `http` or `https`, a host, at most [`URL_MAX`] characters, no
/// credentials in it.
pub(crate) fn check_url(c: &mut Collector, field: &str, url: &str) {
    if url.len() > URL_MAX {
        c.push(field, format!("must be at most {URL_MAX} characters"));
        return;
    }
    match url::Url::parse(url) {
        Ok(u) if !matches!(u.scheme(), "http" | "https") => {
            c.push(field, "must be an http:// or https:// URL")
        }
        Ok(u) if u.host_str().is_none_or(str::is_empty) => c.push(field, "must name a host"),
        Ok(u) if !u.username().is_empty() || u.password().is_some() => c.push(
            field,
            "must not carry credentials (the signature authenticates Berth to the receiver)",
        ),
        Ok(_) => {}
        Err(e) => c.push(field, format!("is not a URL: {e}")),
    }
}

/// Checks a signing secret: [`SECRET_MIN`] to [`SECRET_MAX`] visible ASCII characters.
pub(crate) fn check_secret(c: &mut Collector, field: &str, secret: &str) {
    let ok = (SECRET_MIN..=SECRET_MAX).contains(&secret.len())
        && secret.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        c.push(
            field,
            format!("must be {SECRET_MIN} to {SECRET_MAX} visible ASCII characters"),
        );
    }
}

/// `Berth-Signature`'s value for `body` sent at `t` (unix seconds).
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", hex::encode(hmac_sha256(secret, t, body)))
}

fn hmac_sha256(secret: &str, t: i64, body: &[u8]) -> Vec<u8> {
    // HMAC takes a key of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return Vec::new();
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

/// Whether `header` is a valid `Berth-Signature` of `body` under `secret` (what a receiver
/// does; the tests use it).
pub fn verify(secret: &str, header: &str, body: &[u8]) -> Option<i64> {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (t, v1) = (t?, v1?);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&v1).ok().map(|()| t)
}

/// The wait after failed attempt `attempt` (1-based): 1 s, 4 s, 16 s, … at most an hour.
pub fn backoff_millis(attempt: u32) -> i64 {
    let mut wait = FIRST_BACKOFF_MILLIS;
    for _ in 1..attempt {
        wait = wait.saturating_mul(4);
        if wait >= MAX_BACKOFF_MILLIS {
            return MAX_BACKOFF_MILLIS;
        }
    }
    wait.min(MAX_BACKOFF_MILLIS)
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }
}

/// One try.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub attempt: u32,
    /// Unix milliseconds it started.
    pub at: i64,
    /// The receiver's HTTP status; None when none came.
    pub status_code: Option<u16>,
    /// What went wrong, when something did (a status other than 2xx, a timeout, a refusal).
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// The notification of one ended run, as stored (sealed: it holds the secret).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub run_id: String,
    pub runner_id: String,
    pub url: String,
    pub secret: String,
    /// The event, exactly as every attempt sends it.
    pub body: String,
    pub status: DeliveryStatus,
    pub attempts: Vec<Attempt>,
    /// Attempts made so far (`attempts` keeps at most the last [`ATTEMPTS_KEPT`]).
    pub attempts_made: u32,
    /// Unix milliseconds of the next attempt while pending.
    pub next_attempt_at: Option<i64>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("run_id", &self.run_id)
            .field("url", &self.url)
            .field("status", &self.status)
            .field("attempts_made", &self.attempts_made)
            .field("next_attempt_at", &self.next_attempt_at)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// The notification of `run`, which has just ended at `now`: first attempt at once.
    pub fn new(run: &Run, notify: &Notify, now: i64) -> Delivery {
        Delivery {
            run_id: run.id.clone(),
            runner_id: run.runner_id.clone(),
            url: notify.url.clone(),
            secret: notify.secret.clone(),
            body: event_body(run, now),
            status: DeliveryStatus::Pending,
            attempts: Vec::new(),
            attempts_made: 0,
            next_attempt_at: Some(now),
        }
    }

    /// Records an attempt: delivered on a 2xx, else the next one is due after its backoff, or
    /// the delivery failed after [`MAX_ATTEMPTS`].
    pub fn record(&mut self, mut attempt: Attempt) {
        self.attempts_made += 1;
        attempt.attempt = self.attempts_made;
        let ok = attempt.status_code.is_some_and(|c| (200..300).contains(&c));
        let at = attempt
            .at
            .saturating_add(i64::try_from(attempt.duration_ms).unwrap_or(0));
        self.attempts.push(attempt);
        if self.attempts.len() > ATTEMPTS_KEPT {
            self.attempts.remove(1);
        }
        if ok {
            self.status = DeliveryStatus::Delivered;
            self.next_attempt_at = None;
        } else if self.attempts_made >= MAX_ATTEMPTS {
            self.status = DeliveryStatus::Failed;
            self.next_attempt_at = None;
        } else {
            self.next_attempt_at = Some(at.saturating_add(backoff_millis(self.attempts_made)));
        }
    }
}

/// The event a run's end sends: `{"type": "run.ended", "id", "created_at", "run": {…}}` with the
/// fields a receiver acts on (the full run is `GET /v1/runners/{runner_id}/runs/{id}`).
pub fn event_body(run: &Run, now: i64) -> String {
    let ts = |ms: Option<i64>| ms.and_then(rfc3339_millis);
    let event = serde_json::json!({
        "type": "run.ended",
        "id": run.id,
        "created_at": rfc3339_millis(now),
        "run": {
            "id": run.id,
            "runner_id": run.runner_id,
            "project": run.project,
            "status": run.status.as_str(),
            "exit_code": run.exit_code,
            "error_code": run.error_code.map(|c| c.as_str()),
            "error_message": run.error_message,
            "oom_killed": run.oom_killed,
            "region": run.region,
            "instance_type": run.instance_type,
            "node_id": run.node_id,
            "created_at": ts(Some(run.created_at)),
            "started_at": ts(run.started_at),
            "completed_at": ts(run.completed_at),
            "billed_seconds": run.duration_seconds(),
            "attempt": run.attempt,
            "first_attempt_id": run.first_attempt_id,
            "next_attempt_id": run.next_attempt_id,
            "schedule_id": run.schedule_id,
        },
    });
    event.to_string()
}

fn rfc3339_millis(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_time_dot_body() {
        // Computed independently: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac
        // 0123456789abcdef
        let sig = signature("0123456789abcdef", 1_700_000_000, b"{\"a\":1}");
        assert_eq!(
            sig,
            "t=1700000000,v1=9eb18f493f8ec135d9eb2dad817c369bb4e9cbfa818657897a7437c1cd8c3a23"
        );
    }

    #[test]
    fn verify_accepts_its_own_signature_only() {
        let body = b"{\"type\":\"run.ended\"}";
        let header = signature("a-secret-of-16-chars", 42, body);
        assert_eq!(verify("a-secret-of-16-chars", &header, body), Some(42));
        assert_eq!(verify("another-secret-1234", &header, body), None);
        assert_eq!(verify("a-secret-of-16-chars", &header, b"{}"), None);
        assert_eq!(verify("a-secret-of-16-chars", "t=42", body), None);
    }

    #[test]
    fn backoff_grows_four_fold_to_an_hour() {
        assert_eq!(backoff_millis(1), 1_000);
        assert_eq!(backoff_millis(2), 4_000);
        assert_eq!(backoff_millis(3), 16_000);
        assert_eq!(backoff_millis(7), 3_600_000);
        assert_eq!(backoff_millis(40), 3_600_000);
        let total: i64 = (1..MAX_ATTEMPTS).map(backoff_millis).sum();
        assert!((5 * 3_600_000..7 * 3_600_000).contains(&total), "{total}");
    }

    fn attempt(status_code: Option<u16>) -> Attempt {
        Attempt {
            attempt: 0,
            at: 10_000,
            status_code,
            error: None,
            duration_ms: 5,
        }
    }

    #[test]
    fn a_delivery_retries_until_a_2xx_or_its_last_attempt() {
        let run = crate::model::tests::run();
        let notify = Notify {
            url: "http://127.0.0.1:9/hook".into(),
            secret: "0123456789abcdef".into(),
        };
        let mut d = Delivery::new(&run, &notify, 10_000);
        assert_eq!(d.next_attempt_at, Some(10_000));
        d.record(attempt(Some(500)));
        assert_eq!(d.status, DeliveryStatus::Pending);
        assert_eq!(d.next_attempt_at, Some(10_005 + 1_000));
        d.record(attempt(None));
        assert_eq!(d.next_attempt_at, Some(10_005 + 4_000));
        d.record(attempt(Some(204)));
        assert_eq!(d.status, DeliveryStatus::Delivered);
        assert_eq!(d.next_attempt_at, None);
        assert_eq!(
            d.attempts.iter().map(|a| a.attempt).collect::<Vec<_>>(),
            [1, 2, 3]
        );

        let mut d = Delivery::new(&run, &notify, 10_000);
        for _ in 0..MAX_ATTEMPTS {
            d.record(attempt(Some(503)));
        }
        assert_eq!(d.status, DeliveryStatus::Failed);
        assert_eq!(d.attempts_made, MAX_ATTEMPTS);
        assert!(
            format!("{d:?}").find("0123456789abcdef").is_none(),
            "no secret in Debug"
        );
    }

    #[test]
    fn urls_and_secrets_are_checked() {
        let errors = |url: &str| {
            let mut c = Collector::default();
            check_url(&mut c, "notify_url", url);
            c.finish(()).err().map(|e| e.0.len()).unwrap_or(0)
        };
        assert_eq!(errors("https://hooks.example/berth?x=1"), 0);
        assert_eq!(errors("http://127.0.0.1:8080/"), 0);
        assert_eq!(errors("ftp://hooks.example/"), 1);
        assert_eq!(errors("https://user:pw@hooks.example/"), 1);
        assert_eq!(errors("not a url"), 1);
        assert_eq!(
            errors(&format!("https://h.example/{}", "a".repeat(URL_MAX))),
            1
        );
        let mut c = Collector::default();
        check_secret(&mut c, "notify_secret", "short");
        check_secret(&mut c, "notify_secret", "sixteen chars ok");
        check_secret(&mut c, "notify_secret", "sixteen-chars-ok");
        assert_eq!(c.finish(()).err().map(|e| e.0.len()), Some(2));
    }
}
