//! The in-process harness: the real scheduler and the real API, each on its own
//! `127.0.0.1:0` listener (bound here and handed over, so no port is ever picked and
//! released), in this test's runtime. The scheduler keeps its state in an embedded store under
//! a temporary directory, sealed as `berth-scheduler` seals it. No node agent: what needs a
//! container stays in the end-to-end suite (`tests/`).

use anyhow::{anyhow, bail, Context, Result};
use berth_core::keys;
use berth_core::secrets::SecretKey;
use berth_core::store::{EmbeddedStore, SealedStore};
use berth_scheduler::engine::{Config, Scheduler};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The admin token (`berth-api --token`).
pub const TOKEN: &str = "inproc-test-token-0123456789";
/// The cluster token both servers share.
pub const CLUSTER_TOKEN: &str = "inproc-cluster-token-9876543210";

/// A scheduler and an API serving in this process; both stop when this is dropped.
pub struct Api {
    /// `http://127.0.0.1:<port>`, without a trailing slash.
    pub api_url: String,
    /// The scheduler's gRPC address, `http://127.0.0.1:<port>` (for a fake agent).
    pub scheduler_url: String,
    pub http: reqwest::Client,
    /// The scheduler's data directory (store and secret key), removed on drop.
    _dir: tempfile::TempDir,
    stop: Vec<oneshot::Sender<()>>,
}

/// Resolves when `rx` fires or its sender is dropped.
async fn stopped(rx: oneshot::Receiver<()>) {
    let _ = rx.await;
}

impl Api {
    pub async fn start() -> Result<Api> {
        Api::start_with(berth_api::ServeLimits::default(), None).await
    }

    /// Like [`Api::start`], the API serving within `limits` and, when given, at most
    /// `max_streams_per_key` log streams per key.
    pub async fn start_with(
        limits: berth_api::ServeLimits,
        max_streams_per_key: Option<usize>,
    ) -> Result<Api> {
        let dir = tempfile::tempdir()?;
        let store = EmbeddedStore::open(&dir.path().join("state.redb"))?;
        let secrets = Arc::new(SecretKey::load_or_create(&dir.path().join("secret.key"))?);
        let store = SealedStore::new(
            store,
            secrets.clone(),
            &[keys::RUNNERS, keys::RUNS, keys::RUN_FILES],
        );
        let config = Config {
            secrets: Some(secrets),
            default_registry: "127.0.0.1:1".to_owned(),
            ..Config::default()
        };
        let scheduler = Scheduler::open(store, config).await?;

        let (stop_scheduler, scheduler_stopped) = oneshot::channel();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let scheduler_addr = listener.local_addr()?;
        let gate = berth_scheduler::ClusterGate::new(Some(CLUSTER_TOKEN));
        tokio::spawn(berth_scheduler::serve(
            scheduler,
            listener,
            gate,
            stopped(scheduler_stopped),
        ));

        let (stop_api, api_stopped) = oneshot::channel();
        let schedulers =
            berth_core::failover::SchedulerAddrs::parse(&format!("http://{scheduler_addr}"))?;
        let cluster = berth_api::auth::ClusterToken::new(Some(CLUSTER_TOKEN))?;
        let mut state = berth_api::AppState::new(&schedulers, TOKEN, cluster);
        if let Some(max) = max_streams_per_key {
            state = state.with_max_streams_per_key(max);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let api_url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(berth_api::serve_with(
            state,
            listener,
            limits,
            stopped(api_stopped),
        ));

        Ok(Api {
            api_url,
            scheduler_url: format!("http://{scheduler_addr}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            _dir: dir,
            stop: vec![stop_api, stop_scheduler],
        })
    }

    /// `host:port` of the API, for raw TCP clients.
    pub fn api_addr(&self) -> &str {
        self.api_url.trim_start_matches("http://")
    }

    /// One request with `token` as the bearer token (`None`: no Authorization header); the
    /// body parsed as JSON (`null` when empty, a string when not JSON).
    pub async fn call(
        &self,
        token: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.api_url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let text = res.text().await?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }

    /// A request as the admin.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        self.call(Some(TOKEN), method, path, body).await
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        let (status, v) = self.request(reqwest::Method::GET, path, None).await?;
        if status != 200 {
            bail!("GET {path} answered {status}: {v}");
        }
        Ok(v)
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        let (status, v) = self
            .request(reqwest::Method::POST, path, Some(body))
            .await?;
        if !(200..300).contains(&status) {
            bail!("POST {path} answered {status}: {v}");
        }
        Ok(v)
    }

    /// Creates a busybox runner in `region`; `extra` fields override the defaults.
    pub async fn runner(&self, region: &str, extra: Value) -> Result<String> {
        let mut body = json!({
            "name": "inproc-runner",
            "image_name": "busybox",
            "image_tag": "latest",
            "region": region,
            "instance_type": "standard-s",
            "timeout_seconds": 120,
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let v = self.post("/v1/runners", body).await?;
        v["runner"]["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no runner id in {v}"))
    }

    pub async fn start_run(&self, runner: &str, body: Value) -> Result<String> {
        let v = self
            .post(&format!("/v1/runners/{runner}/runs"), body)
            .await?;
        v["run"]["id"]
            .as_str()
            .map(str::to_owned)
            .context("no run id")
    }

    pub async fn run(&self, runner: &str, run: &str) -> Result<Value> {
        Ok(self
            .get(&format!("/v1/runners/{runner}/runs/{run}"))
            .await?["run"]
            .clone())
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        for stop in self.stop.drain(..) {
            let _ = stop.send(());
        }
    }
}
