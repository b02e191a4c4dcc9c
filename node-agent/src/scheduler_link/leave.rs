//! Leaving the fleet (`berth-node-agent leave`): `AgentService.Leave` on whichever scheduler
//! leads, with the node's credential. `remove = false` drains the node and answers how many
//! runs it still holds; `remove = true` has the scheduler remove it (its credentials revoked,
//! its record deleted) once it holds none.
//!
//! One call, like [`super::enroll`]: the addresses are walked as [`Rotation`] walks them (a
//! standby does not listen; a leader that cannot confirm its leadership answers "not served"),
//! for at most [`LEAVE_BUDGET`]. A call that may have reached a scheduler is sent again too:
//! draining twice is draining, and a removal that was applied before its answer was lost
//! answers `NOT_FOUND` the second time, which is taken as removed.

use berth_core::auth::ACTIVE_RUNS_METADATA;
use berth_core::failover::{Rotation, SchedulerAddrs, NOT_SERVED_METADATA};
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_proto::v1::LeaveRequest;
use std::time::{Duration, Instant};

/// How long a leave looks for a scheduler that answers: a failover takes a few seconds.
pub const LEAVE_BUDGET: Duration = Duration::from_secs(15);

/// What the scheduler said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaveStatus {
    /// The runs still leased to the node (assigned and not started, or running).
    pub active_runs: u32,
    /// The node was removed from the fleet.
    pub removed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaveError {
    /// The scheduler refused the node's credential (missing, revoked, or another node's):
    /// retrying cannot help.
    #[error("the scheduler refused this node's leave: {0}")]
    Refused(String),
    /// The scheduler does not know the node.
    #[error("the scheduler does not know node {0}: it was removed already, or never joined")]
    NotFound(String),
    /// The node still holds runs, so it was not removed (it stays drained).
    #[error("{1}")]
    StillHasRuns(u32, String),
    /// The node credential cannot be sent as gRPC metadata.
    #[error("the node credential is malformed (not printable ASCII)")]
    BadCredential,
    /// Any other refusal.
    #[error("the scheduler refused this node's leave ({code:?}): {message}")]
    Failed { code: tonic::Code, message: String },
    /// No scheduler answered within [`LEAVE_BUDGET`].
    #[error("no scheduler answered at {schedulers} within {waited:?}: {last_error}")]
    Unreachable {
        schedulers: String,
        waited: Duration,
        last_error: String,
    },
}

/// Drains (`remove = false`) or removes (`remove = true`) `node_id` through whichever
/// scheduler leads, presenting `credential` (none on a scheduler without a cluster token).
pub async fn leave(
    schedulers: &SchedulerAddrs,
    node_id: &str,
    credential: Option<&str>,
    remove: bool,
) -> Result<LeaveStatus, LeaveError> {
    leave_within(schedulers, node_id, credential, remove, LEAVE_BUDGET).await
}

/// How one attempt went.
enum Attempt {
    Answered(LeaveStatus),
    /// Final: retrying cannot change it.
    Refused(tonic::Status),
    /// Worth another address; `maybe_applied`: it may have reached a scheduler.
    Retry {
        error: String,
        maybe_applied: bool,
    },
}

async fn leave_within(
    schedulers: &SchedulerAddrs,
    node_id: &str,
    credential: Option<&str>,
    remove: bool,
    budget: Duration,
) -> Result<LeaveStatus, LeaveError> {
    let credential = credential
        .map(tonic::metadata::MetadataValue::try_from)
        .transpose()
        .map_err(|_| LeaveError::BadCredential)?;
    let deadline = Instant::now() + budget;
    let mut rotation = Rotation::new(schedulers.len(), 0);
    let mut maybe_applied = false;
    let mut failures = 0usize;
    loop {
        let endpoint = schedulers.endpoint(rotation.current());
        let url = endpoint.uri().to_string();
        let attempt = match endpoint.connect().await {
            Ok(channel) => {
                let mut request = tonic::Request::new(LeaveRequest {
                    node_id: node_id.to_owned(),
                    remove,
                });
                if let Some(c) = &credential {
                    request
                        .metadata_mut()
                        .insert(berth_core::auth::NODE_CREDENTIAL_METADATA, c.clone());
                }
                match AgentServiceClient::new(channel).leave(request).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        Attempt::Answered(LeaveStatus {
                            active_runs: r.active_runs,
                            removed: r.removed,
                        })
                    }
                    Err(status) => classify(status),
                }
            }
            Err(e) => Attempt::Retry {
                error: format!("{url}: {e}"),
                maybe_applied: false,
            },
        };
        match attempt {
            Attempt::Answered(status) => {
                tracing::info!(node_id, remove, active_runs = status.active_runs, removed = status.removed, scheduler = %url, "leave answered");
                return Ok(status);
            }
            Attempt::Refused(status)
                if remove && maybe_applied && status.code() == tonic::Code::NotFound =>
            {
                // The first attempt removed it; its answer was lost.
                tracing::info!(node_id, scheduler = %url, "leave: removed by an earlier attempt");
                return Ok(LeaveStatus {
                    active_runs: 0,
                    removed: true,
                });
            }
            Attempt::Refused(status) => return Err(refusal(node_id, status)),
            Attempt::Retry {
                error,
                maybe_applied: sent,
            } => {
                maybe_applied |= sent;
                failures += 1;
                if failures == 1 {
                    tracing::warn!(node_id, scheduler = %url, %error, "leave: no answer yet; trying the other schedulers");
                } else {
                    tracing::debug!(node_id, scheduler = %url, %error, "leave: no answer");
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(LeaveError::Unreachable {
                        schedulers: schedulers.to_string(),
                        waited: budget,
                        last_error: error,
                    });
                }
                tokio::time::sleep(rotation.failed().min(deadline - now)).await;
            }
        }
    }
}

/// Whether a refused call is worth another address (and may have been applied).
fn classify(status: tonic::Status) -> Attempt {
    use tonic::Code;
    let not_served = status.metadata().contains_key(NOT_SERVED_METADATA);
    match status.code() {
        // Not the leader (now), or the connection broke: another scheduler may answer.
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled => {
            Attempt::Retry {
                error: format!("{:?}: {}", status.code(), status.message()),
                maybe_applied: !not_served,
            }
        }
        // A concurrent change: nothing was applied.
        Code::Aborted => Attempt::Retry {
            error: status.message().to_owned(),
            maybe_applied: false,
        },
        _ => Attempt::Refused(status),
    }
}

fn refusal(node_id: &str, status: tonic::Status) -> LeaveError {
    use tonic::Code;
    let message = status.message().to_owned();
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => LeaveError::Refused(message),
        Code::NotFound => LeaveError::NotFound(node_id.to_owned()),
        Code::FailedPrecondition => {
            let runs = status
                .metadata()
                .get(ACTIVE_RUNS_METADATA)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            LeaveError::StillHasRuns(runs, message)
        }
        code => LeaveError::Failed { code, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::v1 as pb;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use tonic::{Request, Response, Status};

    /// What a fake scheduler was asked: the credential presented, the request.
    type Asked = Vec<(Option<String>, pb::LeaveRequest)>;

    /// A scheduler that answers each leave with the next scripted answer and records what it
    /// was asked.
    #[derive(Default, Clone)]
    struct Scripted {
        answers: Arc<Mutex<VecDeque<Result<pb::LeaveResponse, Status>>>>,
        asked: Arc<Mutex<Asked>>,
    }

    type Never =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::SchedulerMessage, Status>> + Send>>;

    #[tonic::async_trait]
    impl pb::agent_service_server::AgentService for Scripted {
        type AttachStream = Never;

        async fn attach(
            &self,
            _: Request<tonic::Streaming<pb::AgentMessage>>,
        ) -> Result<Response<Never>, Status> {
            Err(Status::unimplemented("this fake only answers Leave"))
        }

        async fn enroll(
            &self,
            _: Request<pb::EnrollRequest>,
        ) -> Result<Response<pb::EnrollResponse>, Status> {
            Err(Status::unimplemented("this fake only answers Leave"))
        }

        async fn leave(
            &self,
            request: Request<pb::LeaveRequest>,
        ) -> Result<Response<pb::LeaveResponse>, Status> {
            let credential = request
                .metadata()
                .get(berth_core::auth::NODE_CREDENTIAL_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            self.asked
                .lock()
                .expect("lock")
                .push((credential, request.into_inner()));
            let next = self.answers.lock().expect("lock").pop_front();
            next.unwrap_or_else(|| Err(Status::internal("no answer scripted")))
                .map(Response::new)
        }
    }

    impl Scripted {
        fn then(self, answer: Result<pb::LeaveResponse, Status>) -> Self {
            self.answers.lock().expect("lock").push_back(answer);
            self
        }

        fn asked(&self) -> Asked {
            self.asked.lock().expect("lock").clone()
        }
    }

    /// An address nobody listens on (connections refused), then `fake` serving.
    async fn standby_then(fake: Scripted) -> SchedulerAddrs {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dead = closed.local_addr().expect("addr");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let live = listener.local_addr().expect("addr");
        // Released only now, so the live scheduler cannot have been given the same port.
        drop(closed);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::agent_service_server::AgentServiceServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        SchedulerAddrs::parse(&format!("http://{dead},http://{live}")).expect("addrs")
    }

    fn answer(active_runs: u32, removed: bool) -> Result<pb::LeaveResponse, Status> {
        Ok(pb::LeaveResponse {
            active_runs,
            removed,
        })
    }

    #[tokio::test]
    async fn the_leader_answers_past_a_standby_with_the_credential_presented() {
        let fake = Scripted::default().then(answer(2, false));
        let addrs = standby_then(fake.clone()).await;
        let status = leave(&addrs, "fra-1", Some("berthnode_abc_def"), false)
            .await
            .expect("answered");
        assert_eq!(
            status,
            LeaveStatus {
                active_runs: 2,
                removed: false
            }
        );
        let asked = fake.asked();
        assert_eq!(asked.len(), 1);
        assert_eq!(asked[0].0.as_deref(), Some("berthnode_abc_def"));
        assert_eq!(
            (asked[0].1.node_id.as_str(), asked[0].1.remove),
            ("fra-1", false)
        );
    }

    #[tokio::test]
    async fn refusals_become_errors_an_operator_can_act_on() {
        let mut still = Status::failed_precondition(
            "node fra-1 still holds 3 runs: it stays drained; leave again once they have ended",
        );
        still.metadata_mut().insert(
            ACTIVE_RUNS_METADATA,
            tonic::metadata::MetadataValue::from(3u32),
        );
        let fake = Scripted::default()
            .then(Err(still))
            .then(Err(Status::permission_denied(
                "this credential belongs to node fra-2; it cannot act for node fra-1",
            )))
            .then(Err(Status::unauthenticated(
                "the credential of node fra-1 was revoked",
            )))
            .then(Err(Status::not_found("node fra-1 not found")));
        let addrs = standby_then(fake).await;
        match leave(&addrs, "fra-1", Some("c"), true).await {
            Err(LeaveError::StillHasRuns(3, m)) => assert!(m.contains("3 runs"), "{m}"),
            other => panic!("expected StillHasRuns, got {other:?}"),
        }
        match leave(&addrs, "fra-1", Some("c"), true).await {
            Err(e @ LeaveError::Refused(_)) => assert!(e.to_string().contains("fra-2"), "{e}"),
            other => panic!("expected Refused, got {other:?}"),
        }
        assert!(matches!(
            leave(&addrs, "fra-1", Some("c"), true).await,
            Err(LeaveError::Refused(m)) if m.contains("revoked")
        ));
        match leave(&addrs, "fra-1", Some("c"), true).await {
            Err(e @ LeaveError::NotFound(_)) => {
                assert!(e.to_string().contains("removed already"), "{e}")
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
    }

    /// A leader that cannot confirm its leadership answers "not served": asked again. A removal
    /// whose answer was lost after it may have been applied, answered `NOT_FOUND` the second
    /// time, was done.
    #[tokio::test]
    async fn not_served_is_asked_again_and_a_lost_removal_answer_is_taken_as_removed() {
        let mut not_served = Status::unavailable("cannot confirm leadership");
        not_served.metadata_mut().insert(
            NOT_SERVED_METADATA,
            tonic::metadata::MetadataValue::from_static("leadership-unconfirmed"),
        );
        let fake = Scripted::default()
            .then(Err(not_served))
            .then(answer(0, false))
            .then(Err(Status::unavailable("the store failed")))
            .then(Err(Status::not_found("node fra-1 not found")));
        let addrs = standby_then(fake.clone()).await;
        assert_eq!(
            leave(&addrs, "fra-1", None, false).await.expect("drained"),
            LeaveStatus {
                active_runs: 0,
                removed: false
            }
        );
        assert_eq!(
            leave(&addrs, "fra-1", None, true).await.expect("removed"),
            LeaveStatus {
                active_runs: 0,
                removed: true
            }
        );
        let asked = fake.asked();
        assert_eq!(asked.len(), 4);
        assert!(asked.iter().all(|(c, _)| c.is_none()), "no credential sent");
    }

    #[tokio::test]
    async fn no_scheduler_within_the_budget_is_unreachable() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dead = closed.local_addr().expect("addr");
        drop(closed);
        let addrs = SchedulerAddrs::parse(&format!("http://{dead}")).expect("addrs");
        let started = Instant::now();
        match leave_within(&addrs, "fra-1", None, false, Duration::from_millis(300)).await {
            Err(e @ LeaveError::Unreachable { .. }) => {
                assert!(e.to_string().contains(&dead.to_string()), "{e}")
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(
            leave(&addrs, "fra-1", Some("bad\ncredential"), false).await,
            Err(LeaveError::BadCredential)
        ));
    }
}
