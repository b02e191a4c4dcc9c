//! Nodes (the operator's): list, drain, resume, revoke.

use super::ApiResult;
use crate::body::Path;
use crate::error::ErrorBody;
use crate::views::{self, NodeView};
use crate::AppState;
use axum::extract::State;
use axum::Json;
use berth_proto::v1 as pb;
use serde::Serialize;
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
