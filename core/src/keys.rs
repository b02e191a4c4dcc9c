//! Where each record lives in the store. All listing is by prefix, and ids are UUIDv7, so a
//! prefix read returns records in creation order.

pub const RUNNERS: &str = "runners/";
pub const RUNS: &str = "runs/";

pub fn runner(id: &str) -> String {
    format!("{RUNNERS}{id}")
}

pub fn run(id: &str) -> String {
    format!("{RUNS}{id}")
}

pub const SCHEDULES: &str = "schedules/";

/// Run-ended notifications (`core::webhook::Delivery`), sealed: each holds its runner's signing
/// secret. `webhooks/pending/<run id>` while deliveries go on (what a new leader loads),
/// `webhooks/done/<run id>` once delivered or given up (read with the run).
pub const WEBHOOKS: &str = "webhooks/";
pub const WEBHOOKS_PENDING: &str = "webhooks/pending/";

pub fn webhook_pending(run_id: &str) -> String {
    format!("{WEBHOOKS_PENDING}{run_id}")
}

pub fn webhook_done(run_id: &str) -> String {
    format!("{WEBHOOKS}done/{run_id}")
}

/// A schedule (`core::schedule::Schedule`): its overrides may hold secret env values.
pub fn schedule(id: &str) -> String {
    format!("{SCHEDULES}{id}")
}

pub const ACTIVE_RUNS: &str = "active_runs/";

/// Index entry (empty value): run `run_id` has not ended. Written and deleted in the same
/// transaction as the run record that enters or leaves a non-terminal state, so a scheduler
/// that starts (or takes over) reads only the runs this prefix names, never the whole history.
pub fn active_run(run_id: &str) -> String {
    format!("{ACTIVE_RUNS}{run_id}")
}

/// Present once [`ACTIVE_RUNS`] names every run that has not ended: a store written before
/// the index existed has it built once (one scan of [`RUNS`]), then never again.
pub const ACTIVE_RUNS_INDEXED: &str = "meta/active_runs_indexed";

pub const RUN_FILES: &str = "run_files/";

/// The contents of a run's uploaded files (its record holds only their metadata).
pub fn run_files(run_id: &str) -> String {
    format!("{RUN_FILES}{run_id}")
}

/// Index entry: run `run_id` belongs to `runner_id`.
pub fn runner_run(runner_id: &str, run_id: &str) -> String {
    format!("runner_runs/{runner_id}/{run_id}")
}

pub fn runner_runs_prefix(runner_id: &str) -> String {
    format!("runner_runs/{runner_id}/")
}

/// The chunk of a run's log lines whose last line is `seq` (see [`crate::log_chunks`]); an older
/// build stored one line per key under the same name. Zero-padded so byte order is numeric
/// order: the lines after `S` start in the first chunk at or after `log(run_id, S + 1)`.
pub fn log(run_id: &str, seq: u64) -> String {
    format!("logs/{run_id}/{seq:020}")
}

pub fn logs_prefix(run_id: &str) -> String {
    format!("logs/{run_id}/")
}

/// The exclusive end of the key range that starts with `prefix`.
pub fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.to_owned();
    end.push(char::MAX);
    end
}

pub const NODES: &str = "nodes/";

pub fn node(id: &str) -> String {
    format!("{NODES}{id}")
}

pub const REGISTRIES: &str = "registries/";

pub fn registry(id: &str) -> String {
    format!("{REGISTRIES}{id}")
}

/// Which run a runner's idempotency key created (the key is hashed: any bytes, fixed length).
pub fn idempotency(runner_id: &str, key_hash: &str) -> String {
    format!("idempotency/{runner_id}/{key_hash}")
}

pub const IDEMPOTENCY_EXPIRY: &str = "idempotency_expiry/";

/// Expiry index entry of the idempotency key that created run `run_id` (its value names the
/// key). Run ids are UUIDv7, so this prefix lists keys oldest first and a sweep reads only the
/// expired ones.
pub fn idempotency_expiry(run_id: &str) -> String {
    format!("{IDEMPOTENCY_EXPIRY}{run_id}")
}

pub const REGISTRATION_TOKENS: &str = "registration_tokens/";

/// A registration token's record (region, expiry, uses, the hash of its secret), by id.
pub fn registration_token(token_id: &str) -> String {
    format!("{REGISTRATION_TOKENS}{token_id}")
}

pub const NODE_CREDENTIALS: &str = "node_credentials/";

/// A node credential's record (node id, region, the hash of its secret), by id.
pub fn node_credential(credential_id: &str) -> String {
    format!("{NODE_CREDENTIALS}{credential_id}")
}

pub const API_KEYS: &str = "apikeys/";

/// An API key's record (its project, name and the hash of its secret), by public key id.
pub fn api_key(key_id: &str) -> String {
    format!("{API_KEYS}{key_id}")
}
