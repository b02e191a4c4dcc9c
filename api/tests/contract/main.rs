//! The HTTP contract, in process: the real scheduler and API serve on `127.0.0.1:0` listeners
//! in the test's runtime ([`harness`]); no node agent, no containerd. One test binary, one
//! module per concern. What needs a container (runs that start, logs, cleanup) stays in the
//! end-to-end suite under `tests/`.

mod auth;
mod files;
mod harness;
mod limits;
mod nodes;
mod openapi;
mod protection;
mod registries;
mod runners;
mod runs;
mod schedules;
