//! `ControlService`: the public API's way in. Each method converts, calls the engine, converts
//! back; errors map to `tonic::Status` in one place (`error.rs`).

use crate::engine::{NodeInfo, Scheduler, UsageGroup};
use crate::error::SchedulerError;
use berth_core::convert::{env_from_pb, file_inputs_from_pb, runner_to_pb};
use berth_core::model::ContainerRegistry;
use berth_core::store::Store;
use berth_core::validate::{RegistryInput, RunInput, ValidationErrors};
use berth_proto::v1 as pb;
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct ControlApi<S> {
    pub scheduler: Arc<Scheduler<S>>,
}

const WATCH_BATCH: usize = 500;

type Events = Pin<Box<dyn Stream<Item = Result<pb::WatchLogsEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> pb::control_service_server::ControlService for ControlApi<S> {
    async fn create_runner(
        &self,
        r: Request<pb::CreateRunnerRequest>,
    ) -> Result<Response<pb::Runner>, Status> {
        let spec = r
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let (runner, rev) = self.scheduler.create_runner(spec.into()).await?;
        Ok(Response::new(runner_to_pb(&runner, rev)))
    }

    async fn get_runner(
        &self,
        r: Request<pb::GetRunnerRequest>,
    ) -> Result<Response<pb::Runner>, Status> {
        let (runner, rev) = self.scheduler.get_runner(&r.into_inner().id).await?;
        Ok(Response::new(runner_to_pb(&runner, rev)))
    }

    async fn list_runners(
        &self,
        _: Request<pb::ListRunnersRequest>,
    ) -> Result<Response<pb::ListRunnersResponse>, Status> {
        let runners = self.scheduler.list_runners().await?;
        Ok(Response::new(pb::ListRunnersResponse {
            runners: runners
                .iter()
                .map(|(r, rev)| runner_to_pb(r, *rev))
                .collect(),
        }))
    }

    async fn update_runner(
        &self,
        r: Request<pb::UpdateRunnerRequest>,
    ) -> Result<Response<pb::Runner>, Status> {
        let r = r.into_inner();
        let spec = r
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let (runner, rev) = self
            .scheduler
            .update_runner(&r.id, spec.into(), r.revision)
            .await?;
        Ok(Response::new(runner_to_pb(&runner, rev)))
    }

    async fn delete_runner(
        &self,
        r: Request<pb::DeleteRunnerRequest>,
    ) -> Result<Response<pb::DeleteRunnerResponse>, Status> {
        self.scheduler.delete_runner(&r.into_inner().id).await?;
        Ok(Response::new(pb::DeleteRunnerResponse {}))
    }

    async fn create_run(
        &self,
        r: Request<pb::CreateRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let r = r.into_inner();
        let input = run_input(pb::RunOverrides {
            argv_set: r.argv_set,
            argv: r.argv,
            command: r.command,
            entrypoint: r.entrypoint,
            env_variables: r.env_variables,
            files: r.files,
            stop_grace_seconds: r.stop_grace_seconds,
        });
        let (run, replayed) = self
            .scheduler
            .create_run_with_key(&r.runner_id, input, r.idempotency_key.as_deref())
            .await?;
        let mut response = Response::new((&run).into());
        if replayed {
            response.metadata_mut().insert(
                "idempotent-replayed",
                tonic::metadata::MetadataValue::from_static("true"),
            );
        }
        Ok(response)
    }

    async fn create_runs(
        &self,
        r: Request<pb::CreateRunsRequest>,
    ) -> Result<Response<pb::CreateRunsResponse>, Status> {
        let r = r.into_inner();
        let inputs = r.runs.into_iter().map(run_input).collect();
        let runs = self.scheduler.create_runs(&r.runner_id, inputs).await?;
        Ok(Response::new(pb::CreateRunsResponse {
            runs: runs.iter().map(Into::into).collect(),
        }))
    }

    async fn get_run(&self, r: Request<pb::GetRunRequest>) -> Result<Response<pb::Run>, Status> {
        let r = r.into_inner();
        let run = self.scheduler.get_run(&r.runner_id, &r.run_id).await?;
        Ok(Response::new((&run).into()))
    }

    async fn list_runs(
        &self,
        r: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let runs = self.scheduler.list_runs(&r.into_inner().runner_id).await?;
        Ok(Response::new(pb::ListRunsResponse {
            runs: runs.iter().map(Into::into).collect(),
        }))
    }

    async fn stop_run(&self, r: Request<pb::StopRunRequest>) -> Result<Response<pb::Run>, Status> {
        let r = r.into_inner();
        let run = self.scheduler.stop_run(&r.runner_id, &r.run_id).await?;
        Ok(Response::new((&run).into()))
    }

    async fn list_logs(
        &self,
        r: Request<pb::ListLogsRequest>,
    ) -> Result<Response<pb::ListLogsResponse>, Status> {
        let r = r.into_inner();
        self.scheduler.get_run(&r.runner_id, &r.run_id).await?;
        let limit = usize::try_from(r.limit.clamp(1, 1000)).unwrap_or(100);
        let (logs, has_more) = self
            .scheduler
            .list_logs(&r.run_id, r.after_id, limit)
            .await?;
        Ok(Response::new(pb::ListLogsResponse {
            logs: logs.iter().map(Into::into).collect(),
            has_more,
        }))
    }

    type WatchLogsStream = Events;

    async fn watch_logs(
        &self,
        r: Request<pb::WatchLogsRequest>,
    ) -> Result<Response<Self::WatchLogsStream>, Status> {
        let r = r.into_inner();
        self.scheduler.get_run(&r.runner_id, &r.run_id).await?;
        let (tx, rx) = mpsc::channel(WATCH_BATCH);
        let scheduler = self.scheduler.clone();
        tokio::spawn(async move {
            if let Err(status) = watch(scheduler, r, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.scheduler.list_nodes().await;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.into_iter().map(node_to_pb).collect(),
        }))
    }

    async fn drain_node(&self, r: Request<pb::NodeRequest>) -> Result<Response<pb::Node>, Status> {
        let node = self
            .scheduler
            .set_draining(&r.into_inner().id, true)
            .await?;
        Ok(Response::new(node_to_pb(node)))
    }

    async fn resume_node(&self, r: Request<pb::NodeRequest>) -> Result<Response<pb::Node>, Status> {
        let node = self
            .scheduler
            .set_draining(&r.into_inner().id, false)
            .await?;
        Ok(Response::new(node_to_pb(node)))
    }

    async fn warmup_runner(
        &self,
        r: Request<pb::WarmupRunnerRequest>,
    ) -> Result<Response<pb::Runner>, Status> {
        let (runner, rev) = self.scheduler.warmup_runner(&r.into_inner().id).await?;
        Ok(Response::new(runner_to_pb(&runner, rev)))
    }

    async fn get_usage(
        &self,
        r: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let r = r.into_inner();
        let group = UsageGroup::parse(&r.group_by).ok_or_else(|| {
            SchedulerError::from(ValidationErrors::single(
                "group_by",
                "must be runner, instance_type or day",
            ))
        })?;
        let rows = self
            .scheduler
            .usage(r.from_unix_millis, r.to_unix_millis, group)
            .await?;
        Ok(Response::new(pb::GetUsageResponse {
            rows: rows
                .into_iter()
                .map(|u| pb::UsageRow {
                    key: u.key,
                    runs: u.runs,
                    billed_seconds: u.billed_seconds,
                    cost_nano_usd: u.cost_nano_usd,
                })
                .collect(),
        }))
    }

    async fn create_container_registry(
        &self,
        r: Request<pb::CreateContainerRegistryRequest>,
    ) -> Result<Response<pb::ContainerRegistry>, Status> {
        let r = r.into_inner();
        let input = RegistryInput {
            name: Some(r.name),
            host: Some(r.host),
            username: Some(r.username),
            password: Some(r.password),
        };
        let spec = input.validate().map_err(SchedulerError::from)?;
        let reg = self.scheduler.create_registry(spec).await?;
        Ok(Response::new(registry_to_pb(&reg)))
    }

    async fn list_container_registries(
        &self,
        _: Request<pb::ListContainerRegistriesRequest>,
    ) -> Result<Response<pb::ListContainerRegistriesResponse>, Status> {
        let list = self.scheduler.list_registries().await?;
        Ok(Response::new(pb::ListContainerRegistriesResponse {
            container_registries: list.iter().map(registry_to_pb).collect(),
        }))
    }

    async fn get_container_registry(
        &self,
        r: Request<pb::ContainerRegistryRequest>,
    ) -> Result<Response<pb::ContainerRegistry>, Status> {
        let reg = self.scheduler.get_registry(&r.into_inner().id).await?;
        Ok(Response::new(registry_to_pb(&reg)))
    }

    async fn delete_container_registry(
        &self,
        r: Request<pb::ContainerRegistryRequest>,
    ) -> Result<Response<pb::DeleteContainerRegistryResponse>, Status> {
        self.scheduler.delete_registry(&r.into_inner().id).await?;
        Ok(Response::new(pb::DeleteContainerRegistryResponse {}))
    }

    async fn get_catalog(
        &self,
        _: Request<pb::GetCatalogRequest>,
    ) -> Result<Response<pb::Catalog>, Status> {
        Ok(Response::new(
            self.scheduler.config().catalog.as_ref().into(),
        ))
    }
}

/// Per-run overrides as the engine takes them.
fn run_input(o: pb::RunOverrides) -> RunInput {
    RunInput {
        argv: o.argv_set.then_some(o.argv),
        command: o.command,
        entrypoint: o.entrypoint,
        env_variables: (!o.env_variables.is_empty()).then(|| env_from_pb(o.env_variables)),
        files: (!o.files.is_empty()).then(|| file_inputs_from_pb(o.files)),
        stop_grace_seconds: o.stop_grace_seconds.map(i64::from),
    }
}

/// The public view of a registry: never the password.
fn registry_to_pb(r: &ContainerRegistry) -> pb::ContainerRegistry {
    pb::ContainerRegistry {
        id: r.id.clone(),
        name: r.name.clone(),
        host: r.host.clone(),
        username: r.username.clone(),
        created_at_unix_millis: r.created_at,
    }
}

fn node_to_pb(n: NodeInfo) -> pb::Node {
    pb::Node {
        free_memory_mib: n.view.free_memory_mib(),
        id: n.view.id,
        region: n.view.region,
        total_memory_mib: n.view.total_memory_mib,
        cpus: n.cpus,
        max_concurrent_runs: n.view.max_runs,
        running_run_ids: n.running_run_ids,
        status: n.view.status.as_str().to_owned(),
        last_heartbeat_age_millis: u64::try_from(n.last_heartbeat_age.as_millis())
            .unwrap_or(u64::MAX),
        draining: n.draining,
        cached_images: n.view.cached_images.iter().cloned().collect(),
    }
}

/// Sends stored lines after `after_id`, then new ones as they are stored, then the final state.
/// The run's state is read *before* each log read: once a terminal state has been seen, every
/// line the agent sent before its exit report is already stored, so an empty read after it
/// means the stream is complete.
async fn watch<S: Store>(
    scheduler: Arc<Scheduler<S>>,
    r: pb::WatchLogsRequest,
    tx: &mpsc::Sender<Result<pb::WatchLogsEvent, Status>>,
) -> Result<(), Status> {
    let mut changes = scheduler.subscribe();
    let mut after = r.after_id;
    loop {
        changes.borrow_and_update();
        let run = scheduler.get_run(&r.runner_id, &r.run_id).await?;
        let (logs, has_more) = scheduler.list_logs(&r.run_id, after, WATCH_BATCH).await?;
        for line in &logs {
            after = line.id;
            let event = pb::WatchLogsEvent {
                event: Some(pb::watch_logs_event::Event::Log(line.into())),
            };
            if tx.send(Ok(event)).await.is_err() {
                return Ok(()); // the client went away
            }
        }
        if has_more {
            continue;
        }
        if run.status.is_terminal() {
            let state = pb::RunState {
                status: run.status.as_str().to_owned(),
                exit_code: run.exit_code,
            };
            let _ = tx
                .send(Ok(pb::WatchLogsEvent {
                    event: Some(pb::watch_logs_event::Event::State(state)),
                }))
                .await;
            return Ok(());
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = tx.closed() => return Ok(()),
        }
    }
}
