//! Submission: `CreateRun` callers, each timing its own calls, as the API would call.

use crate::agents::Observed;
use anyhow::Context;
use berth_proto::v1 as pb;
use berth_proto::v1::control_service_client::ControlServiceClient;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// One answered `CreateRun`: when it was sent and answered.
pub(crate) struct Submitted {
    pub(crate) run_id: String,
    pub(crate) started: Instant,
    pub(crate) answered: Instant,
}

pub(crate) type AsOperator = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
pub(crate) type Control = ControlServiceClient<InterceptedService<Channel, AsOperator>>;

/// The benchmark calls the control service as the API does for the admin token: in project
/// `default`, as admin (for `ListNodes`).
pub(crate) fn control_client(channel: Channel) -> Control {
    pub(crate) fn as_operator(
        mut req: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let m = req.metadata_mut();
        m.insert(
            berth_core::auth::PROJECT_METADATA,
            tonic::metadata::MetadataValue::from_static(berth_core::auth::DEFAULT_PROJECT),
        );
        m.insert(
            berth_core::auth::ADMIN_METADATA,
            tonic::metadata::MetadataValue::from_static("true"),
        );
        Ok(req)
    }
    ControlServiceClient::with_interceptor(channel, as_operator as AsOperator)
}

pub(crate) async fn submitter(
    mut client: Control,
    runners: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    total: usize,
    observed: Arc<Observed>,
) -> anyhow::Result<Vec<Submitted>> {
    let mut out = Vec::new();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            return Ok(out);
        }
        let started = Instant::now();
        let run = client
            .create_run(pb::CreateRunRequest {
                runner_id: runners[i % runners.len()].clone(),
                ..Default::default()
            })
            .await
            .context("CreateRun")?
            .into_inner();
        observed.answered_count.fetch_add(1, Ordering::Relaxed);
        out.push(Submitted {
            run_id: run.id,
            started,
            answered: Instant::now(),
        });
    }
}
