//! # Layout
//! End-to-end tests live in `tests/`; this crate has no library code.
//!
//! Each file under `tests/` is one suite against real `berth-scheduler`, `berth-api` and
//! `berth-node-agent` processes, containerd, runc and a registry (`deploy/test.sh` starts them);
//! `tests/common/mod.rs` is the harness (each process binds port 0 and the harness reads the
//! port it logs). Only what needs a container or a real process is tested here: the HTTP
//! contract (validation, auth scoping, paging, idempotency, the OpenAPI document) runs in
//! process, in `api/tests/contract/`.
