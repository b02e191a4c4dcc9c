//! Nodes (the operator's): list, drain, resume, revoke, remove.

use super::ApiResult;
use crate::body::{Path, Query};
use crate::error::ErrorBody;
use crate::views::{self, NodeView};
use crate::AppState;
use axum::extract::State;
use axum::Json;
use berth_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
pub struct NodeResponse {
    pub node: NodeView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NodesResponse {
    pub nodes: Vec<NodeView>,
}

#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "nodes",
    summary = "List nodes",
    responses(
        (status = 200, description = "All nodes the scheduler knows", body = NodesResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A project key: nodes are the operator's", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn list_nodes(State(s): State<AppState>) -> ApiResult<Json<NodesResponse>> {
    let list = s
        .control()
        .list_nodes(pb::ListNodesRequest {})
        .await?
        .into_inner();
    Ok(Json(NodesResponse {
        nodes: list
            .nodes
            .iter()
            .map(views::node)
            .collect::<Result<_, _>>()?,
    }))
}

#[utoipa::path(
    post,
    path = "/v1/nodes/{id}/drain",
    tag = "nodes",
    summary = "Drain a node: no new runs; running runs finish",
    params(("id" = String, Path, description = "The node's id")),
    responses(
        (status = 200, description = "The node", body = NodeResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A project key: nodes are the operator's", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "Conflicts with the current state (a concurrent update, a record in use)", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn drain_node(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeResponse>> {
    let node = s
        .control()
        .drain_node(pb::NodeRequest { id })
        .await?
        .into_inner();
    Ok(Json(NodeResponse {
        node: views::node(&node)?,
    }))
}

#[utoipa::path(
    post,
    path = "/v1/nodes/{id}/resume",
    tag = "nodes",
    summary = "Resume a drained node",
    params(("id" = String, Path, description = "The node's id")),
    responses(
        (status = 200, description = "The node", body = NodeResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A project key: nodes are the operator's", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "Conflicts with the current state (a concurrent update, a record in use)", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn resume_node(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeResponse>> {
    let node = s
        .control()
        .resume_node(pb::NodeRequest { id })
        .await?
        .into_inner();
    Ok(Json(NodeResponse {
        node: views::node(&node)?,
    }))
}

/// Revokes the node's credentials: its agent is disconnected at once and cannot come back
/// without enrolling again; runs it had not started are queued again, started ones end
/// `failed` with `node_lost`.
#[utoipa::path(
    post,
    path = "/v1/nodes/{id}/revoke",
    tag = "nodes",
    summary = "Revoke a node: disconnect it and take its runs back",
    params(("id" = String, Path, description = "The node's id")),
    responses(
        (status = 200, description = "The node, now lost", body = NodeResponse),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A project key: nodes are the operator's", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
        (status = 409, description = "Conflicts with the current state (a concurrent update, a record in use)", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn revoke_node(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeResponse>> {
    let node = s
        .control()
        .revoke_node(pb::NodeRequest { id })
        .await?
        .into_inner();
    Ok(Json(NodeResponse {
        node: views::node(&node)?,
    }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RemoveNodeQuery {
    /// `true`: remove the node even while it is connected and holds runs (runs it had not
    /// started are queued again, started ones end `failed` with `node_lost`). Default `false`.
    force: Option<bool>,
}

/// Removes the node from the fleet: its credentials are revoked, its agent disconnected, its
/// runs taken back as a lost node's, and its record deleted (it is no longer listed, also after
/// a scheduler restart). A connected node that still holds runs is refused unless `force`.
#[utoipa::path(
    delete,
    path = "/v1/nodes/{id}",
    tag = "nodes",
    summary = "Remove a node from the fleet",
    params(("id" = String, Path, description = "The node's id"), RemoveNodeQuery),
    responses(
        (status = 200, description = "The node as it was last seen (with the runs it held); it is removed", body = NodeResponse),
        (status = 400, description = "Unknown query parameters, or `force` is not `true` or `false`", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A project key: nodes are the operator's", body = ErrorBody),
        (status = 404, description = "No such node (or it was removed already)", body = ErrorBody),
        (status = 409, description = "The node is connected and holds runs: drain it and wait for them, or remove it with `force=true`", body = ErrorBody),
        (status = 503, description = "The scheduler is unavailable", body = ErrorBody),
    )
)]
pub async fn remove_node(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<RemoveNodeQuery>,
) -> ApiResult<Json<NodeResponse>> {
    let node = s
        .control()
        .remove_node(pb::RemoveNodeRequest {
            node_id: id,
            force: q.force.unwrap_or(false),
        })
        .await?
        .into_inner();
    Ok(Json(NodeResponse {
        node: views::node(&node)?,
    }))
}
