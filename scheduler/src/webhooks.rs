//! Sending run-ended webhooks (issue #15): the leader's delivery loop takes the due deliveries
//! from the engine four times a second, sends each (at most [`CONCURRENT`] at once) through a
//! [`WebhookSender`], and hands the attempt back to the engine, which stores where the delivery
//! stands (see `engine::webhooks` and `core::webhook` for the request and the retry schedule).
//!
//! [`HttpSender`] is the real one. A notify URL comes from a project's user, so by default it
//! refuses destinations that are not public addresses (loopback, private, link-local, …: the
//! control plane's own network, etcd included); it resolves the host itself, checks every
//! address, then connects to the checked address only, and follows no redirect. An operator
//! whose receivers live on a private network allows them with
//! `--webhook-allow-private-networks`.

use crate::engine::Scheduler;
use berth_core::store::Store;
use berth_core::webhook::{signature, Attempt, Delivery, ATTEMPT_TIMEOUT_MILLIS};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Attempts in flight at once.
pub const CONCURRENT: usize = 32;
/// Most of a receiver's answer kept in an attempt's error.
const ERROR_BODY_MAX: usize = 200;

/// Makes one attempt of a delivery.
pub trait WebhookSender: Send + Sync + 'static {
    fn send<'a>(
        &'a self,
        delivery: &'a Delivery,
        attempt: u32,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>>;
}

/// Delivers due webhooks until the task is dropped.
pub async fn deliver_forever<S: Store>(
    scheduler: Arc<Scheduler<S>>,
    sender: Arc<dyn WebhookSender>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENT));
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let free = permits.available_permits();
        if free == 0 {
            continue;
        }
        for delivery in scheduler
            .due_webhooks(berth_core::now_unix_millis(), free)
            .await
        {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let scheduler = scheduler.clone();
            let sender = sender.clone();
            tokio::spawn(async move {
                let attempt = sender.send(&delivery, delivery.attempts_made + 1).await;
                if let Err(error) = scheduler.webhook_attempted(&delivery.run_id, attempt).await {
                    tracing::error!(run_id = %delivery.run_id, %error, "recording a webhook attempt failed");
                }
                drop(permit);
            });
        }
    }
}

/// Sends over HTTP(S) with `reqwest`.
pub struct HttpSender {
    /// Whether destinations on loopback and private networks are allowed.
    pub allow_private_networks: bool,
    /// The only hosts allowed (as the URL names them); None: any.
    pub allowed_hosts: Option<Vec<String>>,
}

impl WebhookSender for HttpSender {
    fn send<'a>(
        &'a self,
        delivery: &'a Delivery,
        attempt: u32,
    ) -> Pin<Box<dyn Future<Output = Attempt> + Send + 'a>> {
        Box::pin(async move {
            let at = berth_core::now_unix_millis();
            let started = Instant::now();
            let outcome = self.post(delivery, attempt).await;
            let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let (status_code, error) = match outcome {
                Ok((code, _)) if (200..300).contains(&code) => (Some(code), None),
                Ok((code, body)) => (
                    Some(code),
                    Some(format!("the receiver answered {code}: {body}")),
                ),
                Err(e) => (None, Some(e)),
            };
            tracing::info!(run_id = %delivery.run_id, url = %delivery.url, attempt, status_code, error = error.as_deref().unwrap_or(""), duration_ms, "run-ended webhook attempt");
            Attempt {
                attempt,
                at,
                status_code,
                error,
                duration_ms,
            }
        })
    }
}

impl HttpSender {
    async fn post(&self, d: &Delivery, attempt: u32) -> Result<(u16, String), String> {
        let url = reqwest::Url::parse(&d.url).map_err(|e| format!("bad URL: {e}"))?;
        let host = url.host_str().ok_or("the URL has no host")?.to_owned();
        let port = url.port_or_known_default().ok_or("the URL has no port")?;
        if let Some(allowed) = &self.allowed_hosts {
            if !allowed.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
                return Err(format!(
                    "{host} is not among the hosts the operator allows (--webhook-allowed-hosts)"
                ));
            }
        }
        let timeout = Duration::from_millis(ATTEMPT_TIMEOUT_MILLIS);
        let addrs: Vec<SocketAddr> = tokio::time::timeout(
            timeout,
            tokio::net::lookup_host((host.trim_matches(|c| c == '[' || c == ']'), port)),
        )
        .await
        .map_err(|_| format!("resolving {host} timed out"))?
        .map_err(|e| format!("resolving {host}: {e}"))?
        .collect();
        let first = *addrs
            .first()
            .ok_or_else(|| format!("{host} has no address"))?;
        if !self.allow_private_networks && addrs.iter().any(|a| !is_public(a.ip())) {
            // Which address is not said: users must not map the internal network with it.
            return Err(format!(
                "{host} resolves to an address that is not a public address; the operator \
                     allows such receivers with --webhook-allow-private-networks"
            ));
        }
        let client = reqwest::Client::builder()
            .resolve(&host, first)
            // A proxy would resolve the host again itself, past the check above.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .user_agent(concat!("berth-scheduler/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        let t = berth_core::now_unix_millis() / 1000;
        let answer = client
            .post(url)
            .header("Content-Type", "application/json")
            .header(
                "Berth-Signature",
                signature(&d.secret, t, d.body.as_bytes()),
            )
            .header("Berth-Event-Id", &d.run_id)
            .header("Berth-Delivery-Attempt", attempt.to_string())
            .body(d.body.clone())
            .send()
            .await
            .map_err(|e| describe(&e))?;
        let code = answer.status().as_u16();
        // Only the start of the answer: a receiver may send without end.
        let mut answer = answer;
        let mut head = Vec::new();
        while head.len() < ERROR_BODY_MAX {
            match answer.chunk().await {
                Ok(Some(chunk)) => head.extend_from_slice(&chunk),
                _ => break,
            }
        }
        let body: String = String::from_utf8_lossy(&head)
            .chars()
            .take(ERROR_BODY_MAX)
            .collect();
        Ok((code, body))
    }
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("no answer within {} s", ATTEMPT_TIMEOUT_MILLIS / 1000)
    } else if e.is_connect() {
        format!("cannot connect: {e}")
    } else {
        e.to_string()
    }
}

/// Whether `ip` is an address on the public internet (not loopback, private, link-local,
/// shared, documentation, multicast, unspecified, …).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let o = v6.octets();
            // NAT64 (64:ff9b::/96, 64:ff9b:1::/48) and 6to4 (2002::/16) reach IPv4 addresses.
            if o[..4] == [0, 0x64, 0xff, 0x9b] {
                return is_public(IpAddr::V4(std::net::Ipv4Addr::new(
                    o[12], o[13], o[14], o[15],
                )));
            }
            if o[..2] == [0x20, 0x02] {
                return is_public(IpAddr::V4(std::net::Ipv4Addr::new(o[2], o[3], o[4], o[5])));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(url: &str) -> Delivery {
        Delivery {
            run_id: "r".into(),
            runner_id: "x".into(),
            url: url.into(),
            secret: "0123456789abcdef".into(),
            body: "{}".into(),
            status: berth_core::webhook::DeliveryStatus::Pending,
            attempts: vec![],
            attempts_made: 0,
            next_attempt_at: Some(0),
        }
    }

    /// Refused before any lookup or connection: these tests send nothing anywhere.
    #[tokio::test]
    async fn hosts_outside_the_allow_list_and_private_addresses_are_refused() {
        let sender = HttpSender {
            allow_private_networks: false,
            allowed_hosts: Some(vec!["hooks.example".into()]),
        };
        let a = sender
            .send(&delivery("https://elsewhere.example/x"), 1)
            .await;
        assert_eq!(a.status_code, None);
        assert!(
            a.error
                .as_deref()
                .is_some_and(|e| e.contains("--webhook-allowed-hosts")),
            "{a:?}"
        );
        let sender = HttpSender {
            allow_private_networks: false,
            allowed_hosts: None,
        };
        for url in [
            "http://127.0.0.1:9/hook",
            "http://[::1]:9/",
            "http://169.254.169.254/latest",
        ] {
            let a = sender.send(&delivery(url), 1).await;
            assert!(
                a.error
                    .as_deref()
                    .is_some_and(|e| e.contains("not a public address")),
                "{url}: {a:?}"
            );
        }
    }

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::",
            "224.0.0.1",
            "198.18.0.1",
            "64:ff9b::a00:5",
            "2002:a00:1::1",
            "192.0.0.8",
        ] {
            assert!(!is_public(private.parse().expect("ip")), "{private}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(is_public(public.parse().expect("ip")), "{public}");
        }
    }
}
