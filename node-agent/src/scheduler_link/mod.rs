//! The agent's one connection to the scheduler.
//!
//! - [`session`]: the outbound gRPC stream (`AgentService.Attach`): register, heartbeat,
//!   assignments, stops, warmups, warm pins; reconnects with jittered backoff; startup
//!   recovery; SIGTERM drain. Reports reach it through [`crate::outbox`].

pub mod session;
