//! `ControlService`: the public API's way in. Each method converts, calls the engine, converts
//! back; errors map to `tonic::Status` in one place (`error.rs`).
//!
//! Every method but `AuthenticateApiKey` and `GetCatalog` acts for the caller the API names in
//! the request's metadata: its project (`x-berth-project`, required — a request without one is
//! refused, never defaulted) and, for nodes and API keys, the admin flag (`x-berth-admin`).
//! The engine takes the project on every call and answers NOT_FOUND for another project's ids.

use crate::engine::{NodeInfo, Removal, RemovedNode, Scheduler, UsageGroup};
use crate::error::SchedulerError;
use berth_core::auth::{self, ApiKey};
use berth_core::convert::{
    node_state_to_pb, overrides_from_pb, run_status_to_pb, runner_to_pb, schedule_input_from_pb,
    schedule_to_pb,
};
use berth_core::model::ContainerRegistry;
use berth_core::store::Store;
use berth_core::validate::{RegistryInput, ValidationErrors};
use berth_core::RunStatus;
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

/// Lines a log watch reads per store read (a page is also bounded by `LOG_PAGE_MAX_BYTES`) and
/// the events it buffers for a slow client. Several chunks' worth (`log_chunks::MAX_CHUNK_LINES`):
/// a page smaller than a chunk inflated the same chunk again for every page.
const WATCH_BATCH: usize = 4096;

impl<S: Store> ControlApi<S> {
    /// A node's view, with the error that ended its last agent session if it has not delivered
    /// a report since.
    fn node_to_pb(&self, n: NodeInfo) -> pb::Node {
        let last_error = self
            .scheduler
            .delivery_error(&n.view.id)
            .unwrap_or_default();
        node_to_pb(n, last_error)
    }
}

/// The caller's project, from the metadata the API sets after authenticating the request.
fn project<T>(r: &Request<T>) -> Result<String, Status> {
    let p = r
        .metadata()
        .get(auth::PROJECT_METADATA)
        .and_then(|v| v.to_str().ok())
        .filter(|p| auth::is_project_name(p))
        .ok_or_else(|| {
            Status::unauthenticated(format!(
                "the request names no valid project (metadata {})",
                auth::PROJECT_METADATA
            ))
        })?;
    Ok(p.to_owned())
}

/// Nodes and API keys are for the operator (the API's admin token) only.
fn require_admin<T>(r: &Request<T>) -> Result<(), Status> {
    let admin = r
        .metadata()
        .get(auth::ADMIN_METADATA)
        .and_then(|v| v.to_str().ok())
        == Some("true");
    if admin {
        Ok(())
    } else {
        Err(SchedulerError::Forbidden("this operation needs the admin token".to_owned()).into())
    }
}

fn api_key_to_pb(k: &ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        key_id: k.key_id.clone(),
        project: k.project.clone(),
        name: k.name.clone(),
        created_at_unix_millis: k.created_at,
        revoked_at_unix_millis: k.revoked_at,
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<pb::WatchLogsEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> pb::control_service_server::ControlService for ControlApi<S> {
    async fn create_runner(
        &self,
        r: Request<pb::CreateRunnerRequest>,
    ) -> Result<Response<pb::Runner>, Status> {
        let project = project(&r)?;
        let spec = r
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let (runner, rev) = self.scheduler.create_runner(&project, spec.into()).await?;
        Ok(Response::new(runner_to_pb(&runner, rev)))
    }

    async fn get_runner(
        &self,
        r: Request<pb::GetRunnerRequest>,
    ) -> Result<Response<pb::Runner>, Status> {
        let project = project(&r)?;
        let (runner, rev) = self
            .scheduler
            .get_runner(&project, &r.into_inner().id)
            .await?;
        let mut out = runner_to_pb(&runner, rev);
        out.warmup_image_pull = self
            .scheduler
            .warmup_pull(&runner)
            .as_ref()
            .map(pb::ImagePull::from);
        Ok(Response::new(out))
    }

    async fn list_runners(
        &self,
        r: Request<pb::ListRunnersRequest>,
    ) -> Result<Response<pb::ListRunnersResponse>, Status> {
        let runners = self.scheduler.list_runners(&project(&r)?).await?;
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
        let project = project(&r)?;
        let r = r.into_inner();
        let spec = r
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let (runner, rev) = self
            .scheduler
            .update_runner(&project, &r.id, spec.into(), r.revision)
            .await?;
        Ok(Response::new(runner_to_pb(&runner, rev)))
    }

    async fn delete_runner(
        &self,
        r: Request<pb::DeleteRunnerRequest>,
    ) -> Result<Response<pb::DeleteRunnerResponse>, Status> {
        let project = project(&r)?;
        self.scheduler
            .delete_runner(&project, &r.into_inner().id)
            .await?;
        Ok(Response::new(pb::DeleteRunnerResponse {}))
    }

    async fn create_schedule(
        &self,
        r: Request<pb::CreateScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let project = project(&r)?;
        let r = r.into_inner();
        let input =
            schedule_input_from_pb(r.input.unwrap_or_default()).map_err(SchedulerError::from)?;
        let s = self
            .scheduler
            .create_schedule(&project, &r.runner_id, input)
            .await?;
        Ok(Response::new(schedule_to_pb(&s)))
    }

    async fn get_schedule(
        &self,
        r: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let project = project(&r)?;
        let r = r.into_inner();
        let s = self
            .scheduler
            .get_schedule(&project, &r.runner_id, &r.id)
            .await?;
        Ok(Response::new(schedule_to_pb(&s)))
    }

    async fn list_schedules(
        &self,
        r: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        let project = project(&r)?;
        let list = self
            .scheduler
            .list_schedules(&project, &r.into_inner().runner_id)
            .await?;
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules: list.iter().map(schedule_to_pb).collect(),
        }))
    }

    async fn update_schedule(
        &self,
        r: Request<pb::UpdateScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let project = project(&r)?;
        let r = r.into_inner();
        let input =
            schedule_input_from_pb(r.input.unwrap_or_default()).map_err(SchedulerError::from)?;
        let s = self
            .scheduler
            .update_schedule(&project, &r.runner_id, &r.id, input)
            .await?;
        Ok(Response::new(schedule_to_pb(&s)))
    }

    async fn delete_schedule(
        &self,
        r: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::DeleteScheduleResponse>, Status> {
        let project = project(&r)?;
        let r = r.into_inner();
        self.scheduler
            .delete_schedule(&project, &r.runner_id, &r.id)
            .await?;
        Ok(Response::new(pb::DeleteScheduleResponse {}))
    }

    async fn create_run(
        &self,
        r: Request<pb::CreateRunRequest>,
    ) -> Result<Response<pb::Run>, Status> {
        let project = project(&r)?;
        let r = r.into_inner();
        // No overrides message: no overrides, like an empty batch item.
        let overrides = overrides_from_pb(r.overrides.unwrap_or_default());
        let (run, replayed) = self
            .scheduler
            .create_run_with_key(
                &project,
                &r.runner_id,
                overrides,
                r.idempotency_key.as_deref(),
            )
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
        let project = project(&r)?;
        let r = r.into_inner();
        let items = r.runs.into_iter().map(overrides_from_pb).collect();
        let runs = self
            .scheduler
            .create_runs(&project, &r.runner_id, items)
            .await?;
        Ok(Response::new(pb::CreateRunsResponse {
            runs: runs.iter().map(Into::into).collect(),
        }))
    }

    async fn get_run(&self, r: Request<pb::GetRunRequest>) -> Result<Response<pb::Run>, Status> {
        let project = project(&r)?;
        let r = r.into_inner();
        let run = self
            .scheduler
            .get_run(&project, &r.runner_id, &r.run_id)
            .await?;
        Ok(Response::new((&run).into()))
    }

    async fn list_runs(
        &self,
        r: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let project = project(&r)?;
        let req = r.into_inner();
        let limit = match req.limit {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let after = (!req.after_id.is_empty()).then_some(req.after_id.as_str());
        let (runs, next) = self
            .scheduler
            .list_runs(&project, &req.runner_id, after, limit, req.newest_first)
            .await?;
        Ok(Response::new(pb::ListRunsResponse {
            runs: runs.iter().map(Into::into).collect(),
            next_after_id: next.unwrap_or_default(),
        }))
    }

    async fn list_active_runs(
        &self,
        r: Request<pb::ListActiveRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let project = project(&r)?;
        // An admin sees every project's queue.
        let project = require_admin(&r).is_err().then_some(project);
        let req = r.into_inner();
        let status = match req.status.as_str() {
            "" => None,
            "pending" => Some(RunStatus::Pending),
            "running" => Some(RunStatus::Running),
            other => {
                return Err(Status::invalid_argument(format!(
                    "status {other}: only pending or running runs are active"
                )))
            }
        };
        let limit = match req.limit {
            0 => usize::MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let (runs, next) = self
            .scheduler
            .list_active_runs(
                project.as_deref(),
                status,
                (!req.region.is_empty()).then_some(req.region.as_str()),
                (!req.after_id.is_empty()).then_some(req.after_id.as_str()),
                limit,
            )
            .await?;
        Ok(Response::new(pb::ListRunsResponse {
            runs: runs.iter().map(Into::into).collect(),
            next_after_id: next.unwrap_or_default(),
        }))
    }

    async fn stop_run(&self, r: Request<pb::StopRunRequest>) -> Result<Response<pb::Run>, Status> {
        let project = project(&r)?;
        let r = r.into_inner();
        let run = self
            .scheduler
            .stop_run(&project, &r.runner_id, &r.run_id)
            .await?;
        Ok(Response::new((&run).into()))
    }

    async fn list_logs(
        &self,
        r: Request<pb::ListLogsRequest>,
    ) -> Result<Response<pb::ListLogsResponse>, Status> {
        let project = project(&r)?;
        let r = r.into_inner();
        let limit = usize::try_from(r.limit.clamp(1, 1000)).unwrap_or(100);
        let (logs, has_more) = self
            .scheduler
            .list_logs(&project, &r.runner_id, &r.run_id, r.after_id, limit)
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
        let project = project(&r)?;
        let r = r.into_inner();
        self.scheduler
            .get_run(&project, &r.runner_id, &r.run_id)
            .await?;
        // Buffered for a slow client: pages of up to `LOG_PAGE_MAX_BYTES` when batched.
        let (tx, rx) = mpsc::channel(if r.batched { 4 } else { WATCH_BATCH });
        let scheduler = self.scheduler.clone();
        tokio::spawn(async move {
            if let Err(status) = watch(scheduler, project, r, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_nodes(
        &self,
        r: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        require_admin(&r)?;
        let nodes = self.scheduler.list_nodes().await;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.into_iter().map(|n| self.node_to_pb(n)).collect(),
        }))
    }

    async fn drain_node(&self, r: Request<pb::NodeRequest>) -> Result<Response<pb::Node>, Status> {
        require_admin(&r)?;
        let node = self
            .scheduler
            .set_draining(&r.into_inner().id, true)
            .await?;
        Ok(Response::new(self.node_to_pb(node)))
    }

    async fn resume_node(&self, r: Request<pb::NodeRequest>) -> Result<Response<pb::Node>, Status> {
        require_admin(&r)?;
        let node = self
            .scheduler
            .set_draining(&r.into_inner().id, false)
            .await?;
        Ok(Response::new(self.node_to_pb(node)))
    }

    async fn revoke_node(&self, r: Request<pb::NodeRequest>) -> Result<Response<pb::Node>, Status> {
        require_admin(&r)?;
        let id = r.into_inner().id;
        self.scheduler.revoke_node(&id).await?;
        let node = self
            .scheduler
            .list_nodes()
            .await
            .into_iter()
            .find(|n| n.view.id == id);
        Ok(Response::new(match node {
            Some(n) => self.node_to_pb(n),
            // Enrolled, never connected to this scheduler.
            None => pb::Node {
                id,
                status: pb::NodeState::Lost as i32,
                ..pb::Node::default()
            },
        }))
    }

    async fn remove_node(
        &self,
        r: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        require_admin(&r)?;
        let r = r.into_inner();
        let removed = self
            .scheduler
            .remove_node(&r.node_id, Removal::Admin { force: r.force })
            .await?;
        Ok(Response::new(removed_node_to_pb(removed)))
    }

    async fn create_registration_token(
        &self,
        r: Request<pb::CreateRegistrationTokenRequest>,
    ) -> Result<Response<pb::CreateRegistrationTokenResponse>, Status> {
        require_admin(&r)?;
        let r = r.into_inner();
        let expires_in = (r.expires_in_seconds > 0)
            .then(|| std::time::Duration::from_secs(r.expires_in_seconds));
        let (token, plaintext) = self
            .scheduler
            .create_registration_token(&r.region, &r.name, expires_in, r.single_use)
            .await?;
        Ok(Response::new(pb::CreateRegistrationTokenResponse {
            registration_token: Some(registration_token_to_pb(&token)),
            plaintext_token: plaintext,
        }))
    }

    async fn list_registration_tokens(
        &self,
        r: Request<pb::ListRegistrationTokensRequest>,
    ) -> Result<Response<pb::ListRegistrationTokensResponse>, Status> {
        require_admin(&r)?;
        let tokens = self.scheduler.list_registration_tokens().await?;
        Ok(Response::new(pb::ListRegistrationTokensResponse {
            registration_tokens: tokens.iter().map(registration_token_to_pb).collect(),
        }))
    }

    async fn revoke_registration_token(
        &self,
        r: Request<pb::RevokeRegistrationTokenRequest>,
    ) -> Result<Response<pb::RegistrationToken>, Status> {
        require_admin(&r)?;
        let token = self
            .scheduler
            .revoke_registration_token(&r.into_inner().token_id)
            .await?;
        Ok(Response::new(registration_token_to_pb(&token)))
    }

    async fn warmup_runner(
        &self,
        r: Request<pb::WarmupRunnerRequest>,
    ) -> Result<Response<pb::Runner>, Status> {
        let project = project(&r)?;
        let r = r.into_inner();
        let (runner, rev) = self
            .scheduler
            .warmup_runner(&project, &r.id, r.sandboxes)
            .await?;
        Ok(Response::new(runner_to_pb(&runner, rev)))
    }

    async fn get_usage(
        &self,
        r: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let project = project(&r)?;
        let r = r.into_inner();
        let group = UsageGroup::parse(&r.group_by).ok_or_else(|| {
            SchedulerError::from(ValidationErrors::single(
                "group_by",
                "must be runner, instance_type or day",
            ))
        })?;
        let rows = self
            .scheduler
            .usage(&project, r.from_unix_millis, r.to_unix_millis, group)
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
        let project = project(&r)?;
        let r = r.into_inner();
        let input = RegistryInput {
            name: Some(r.name),
            host: Some(r.host),
            username: Some(r.username),
            password: Some(r.password),
        };
        let spec = input.validate().map_err(SchedulerError::from)?;
        let reg = self.scheduler.create_registry(&project, spec).await?;
        Ok(Response::new(registry_to_pb(&reg)))
    }

    async fn list_container_registries(
        &self,
        r: Request<pb::ListContainerRegistriesRequest>,
    ) -> Result<Response<pb::ListContainerRegistriesResponse>, Status> {
        let list = self.scheduler.list_registries(&project(&r)?).await?;
        Ok(Response::new(pb::ListContainerRegistriesResponse {
            container_registries: list.iter().map(registry_to_pb).collect(),
        }))
    }

    async fn get_container_registry(
        &self,
        r: Request<pb::ContainerRegistryRequest>,
    ) -> Result<Response<pb::ContainerRegistry>, Status> {
        let project = project(&r)?;
        let reg = self
            .scheduler
            .get_registry(&project, &r.into_inner().id)
            .await?;
        Ok(Response::new(registry_to_pb(&reg)))
    }

    async fn delete_container_registry(
        &self,
        r: Request<pb::ContainerRegistryRequest>,
    ) -> Result<Response<pb::DeleteContainerRegistryResponse>, Status> {
        let project = project(&r)?;
        self.scheduler
            .delete_registry(&project, &r.into_inner().id)
            .await?;
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

    async fn create_api_key(
        &self,
        r: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        require_admin(&r)?;
        let r = r.into_inner();
        let (key, plaintext) = self.scheduler.create_api_key(&r.project, &r.name).await?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(api_key_to_pb(&key)),
            plaintext_key: plaintext,
        }))
    }

    async fn list_api_keys(
        &self,
        r: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        require_admin(&r)?;
        let r = r.into_inner();
        let project = (!r.project.is_empty()).then_some(r.project.as_str());
        let keys = self.scheduler.list_api_keys(project).await?;
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: keys.iter().map(api_key_to_pb).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        r: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        require_admin(&r)?;
        let key = self
            .scheduler
            .revoke_api_key(&r.into_inner().key_id)
            .await?;
        Ok(Response::new(api_key_to_pb(&key)))
    }

    async fn authenticate_api_key(
        &self,
        r: Request<pb::AuthenticateApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let key = self
            .scheduler
            .authenticate_api_key(&r.into_inner().key)
            .await?;
        Ok(Response::new(api_key_to_pb(&key)))
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

fn registration_token_to_pb(t: &auth::RegistrationToken) -> pb::RegistrationToken {
    pb::RegistrationToken {
        token_id: t.token_id.clone(),
        region: t.region.clone(),
        name: t.name.clone(),
        created_at_unix_millis: t.created_at,
        expires_at_unix_millis: t.expires_at,
        single_use: t.single_use,
        uses: t.uses,
        revoked_at_unix_millis: t.revoked_at,
    }
}

/// A removed node as it was last seen; one that never connected to this scheduler shows its id,
/// its region and `disconnected`.
fn removed_node_to_pb(r: RemovedNode) -> pb::Node {
    match r.last_seen {
        Some(n) => node_to_pb(n, r.last_error.unwrap_or_default()),
        None => pb::Node {
            id: r.node_id,
            region: r.region,
            status: pb::NodeState::Disconnected as i32,
            last_error: r.last_error.unwrap_or_default(),
            ..pb::Node::default()
        },
    }
}

fn node_to_pb(n: NodeInfo, last_error: String) -> pb::Node {
    pb::Node {
        last_error,
        free_memory_mib: n.view.free_memory_mib(),
        id: n.view.id,
        region: n.view.region,
        total_memory_mib: n.view.total_memory_mib,
        cpus: n.cpus,
        max_concurrent_runs: n.view.max_runs,
        running_run_ids: n.running_run_ids,
        status: node_state_to_pb(n.view.status).into(),
        last_heartbeat_age_millis: u64::try_from(n.last_heartbeat_age.as_millis())
            .unwrap_or(u64::MAX),
        draining: n.draining,
        cached_images: n.view.cached_images.iter().cloned().collect(),
        runtimes: n.runtimes,
    }
}

/// Sends stored lines after `after_id`, then new ones as they are stored, then the final state.
/// The run's state is read *before* each log read: once a terminal state has been seen, every
/// line the agent sent before its exit report is already stored, so an empty read after it
/// means the stream is complete.
async fn watch<S: Store>(
    scheduler: Arc<Scheduler<S>>,
    project: String,
    r: pb::WatchLogsRequest,
    tx: &mpsc::Sender<Result<pb::WatchLogsEvent, Status>>,
) -> Result<(), Status> {
    let mut changes = scheduler.subscribe();
    let mut after = r.after_id;
    loop {
        changes.borrow_and_update();
        let run = scheduler.get_run(&project, &r.runner_id, &r.run_id).await?;
        let (logs, has_more) = scheduler
            .list_logs(&project, &r.runner_id, &r.run_id, after, WATCH_BATCH)
            .await?;
        if let Some(last) = logs.last() {
            after = last.id;
        }
        let events: Vec<pb::WatchLogsEvent> = if r.batched {
            // One message per page: a client catching up does not pay per line.
            if logs.is_empty() {
                Vec::new()
            } else {
                vec![pb::WatchLogsEvent {
                    event: Some(pb::watch_logs_event::Event::Logs(pb::LogEntries {
                        lines: logs.iter().map(Into::into).collect(),
                    })),
                }]
            }
        } else {
            logs.iter()
                .map(|line| pb::WatchLogsEvent {
                    event: Some(pb::watch_logs_event::Event::Log(line.into())),
                })
                .collect()
        };
        for event in events {
            if tx.send(Ok(event)).await.is_err() {
                return Ok(()); // the client went away
            }
        }
        if has_more {
            continue;
        }
        if run.status.is_terminal() {
            let state = pb::RunState {
                status: run_status_to_pb(run.status).into(),
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
