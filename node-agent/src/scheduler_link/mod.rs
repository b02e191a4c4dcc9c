//! The agent's one connection to the scheduler.
//!
//! - [`enroll`]: the node's credential, from its file or by exchanging a registration token.
//! - [`session`]: the outbound gRPC stream (`AgentService.Attach`): register, heartbeat,
//!   assignments, stops, warmups, warm pins; reconnects with jittered backoff; startup
//!   recovery; SIGTERM drain. Reports reach it through [`crate::outbox`].

pub mod enroll;
pub mod leave;
pub mod session;
