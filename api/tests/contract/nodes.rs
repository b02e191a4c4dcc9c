//! Removing a node: `DELETE /v1/nodes/{id}` (`force` validated), with a fake agent enrolled
//! and attached over gRPC as a real one is: refused (409, naming the count and what to do)
//! while it is connected and holds a run, removed with `force=true` (200, the node as it was
//! last seen; the run queued again), no longer listed, and 404 afterwards.

use crate::harness::Api;
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use berth_proto::v1 as pb;
use berth_proto::v1::agent_message::Body;
use berth_proto::v1::agent_service_client::AgentServiceClient;
use berth_proto::v1::scheduler_message::Body as Command;
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;

/// A node agent reduced to its session: enrolled with a registration token the admin created,
/// attached with its credential, registered in `region`.
struct FakeAgent {
    _to_scheduler: futures::channel::mpsc::UnboundedSender<pb::AgentMessage>,
    from_scheduler: tonic::Streaming<pb::SchedulerMessage>,
}

impl FakeAgent {
    async fn join(f: &Api, node_id: &str, region: &str) -> Result<FakeAgent> {
        let v = f
            .post(
                "/v1/admin/registration_tokens",
                json!({"region": region, "single_use": true}),
            )
            .await?;
        let token = v["token"].as_str().context("no token")?.to_owned();
        let channel = tonic::transport::Channel::from_shared(f.scheduler_url.clone())?
            .connect()
            .await?;
        let mut client = AgentServiceClient::new(channel);
        let credential = client
            .enroll(pb::EnrollRequest {
                registration_token: token,
                node_id: node_id.to_owned(),
                region: region.to_owned(),
            })
            .await?
            .into_inner()
            .node_credential;
        let (to_scheduler, outbound) = futures::channel::mpsc::unbounded();
        to_scheduler.unbounded_send(pb::AgentMessage {
            seq: 0,
            body: Some(Body::Register(pb::Register {
                node_id: node_id.to_owned(),
                boot_id: "boot-1".to_owned(),
                region: region.to_owned(),
                total_memory_mib: 4096,
                cpus: 2,
                max_concurrent_runs: 4,
                runtimes: vec!["runc".to_owned()],
                ..Default::default()
            })),
        })?;
        let mut request = tonic::Request::new(outbound);
        request.metadata_mut().insert(
            berth_core::auth::NODE_CREDENTIAL_METADATA,
            credential.parse()?,
        );
        let from_scheduler = client.attach(request).await?.into_inner();
        let mut agent = FakeAgent {
            _to_scheduler: to_scheduler,
            from_scheduler,
        };
        match agent.next().await? {
            Command::Registered(_) => Ok(agent),
            other => bail!("expected Registered, got {other:?}"),
        }
    }

    async fn next(&mut self) -> Result<Command> {
        tokio::time::timeout(Duration::from_secs(10), self.from_scheduler.message())
            .await
            .context("nothing from the scheduler within 10 s")??
            .and_then(|m| m.body)
            .ok_or_else(|| anyhow!("the session ended"))
    }

    /// The next assignment (warm pin sets are skipped).
    async fn assignment(&mut self) -> Result<pb::AssignRun> {
        loop {
            match self.next().await? {
                Command::AssignRun(a) => return Ok(a),
                Command::WarmPins(_) => continue,
                other => bail!("expected an assignment, got {other:?}"),
            }
        }
    }

    /// How the session ended (the scheduler's status).
    async fn closed(&mut self) -> Result<tonic::Status> {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.from_scheduler.message())
                .await
                .context("the session was not closed")?
            {
                Ok(Some(_)) => continue,
                Ok(None) => bail!("the session ended without a status"),
                Err(status) => return Ok(status),
            }
        }
    }
}

fn listed(nodes: &Value, id: &str) -> bool {
    nodes["nodes"]
        .as_array()
        .is_some_and(|list| list.iter().any(|n| n["id"] == id))
}

#[tokio::test]
async fn removing_a_node_is_refused_while_it_holds_runs_unless_forced() -> Result<()> {
    let f = Api::start().await?;
    let mut agent = FakeAgent::join(&f, "fra-1", "fra").await?;
    ensure!(listed(&f.get("/v1/nodes").await?, "fra-1"), "attached");
    let runner = f.runner("fra", json!({})).await?;
    let run = f.start_run(&runner, json!({})).await?;
    let assigned = agent.assignment().await?;
    ensure!(assigned.run_id == run, "{assigned:?}");

    let (status, v) = f.request(Method::DELETE, "/v1/nodes/fra-1", None).await?;
    ensure!(status == 409 && v["code"] == "conflict", "{status} {v}");
    let message = v["errors"][0]["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("node fra-1 holds 1 run")
            && message.contains("drain it")
            && message.contains("force"),
        "{v}"
    );
    ensure!(listed(&f.get("/v1/nodes").await?, "fra-1"), "still listed");

    let (status, v) = f
        .request(Method::DELETE, "/v1/nodes/fra-1?force=true", None)
        .await?;
    ensure!(status == 200, "{status} {v}");
    ensure!(
        v["node"]["id"] == "fra-1"
            && v["node"]["region"] == "fra"
            && v["node"]["status"] == "ready"
            && v["node"]["running_runs"] == json!([run]),
        "the node as it was last seen: {v}"
    );
    let closed = agent.closed().await?;
    ensure!(
        closed.code() == tonic::Code::Unauthenticated && closed.message().contains("removed"),
        "{closed:?}"
    );
    ensure!(
        !listed(&f.get("/v1/nodes").await?, "fra-1"),
        "no longer listed"
    );
    let again = f.run(&runner, &run).await?;
    ensure!(
        again["status"] == "pending" && again["node_id"].is_null(),
        "not started: queued again: {again}"
    );

    let (status, v) = f.request(Method::DELETE, "/v1/nodes/fra-1", None).await?;
    ensure!(
        status == 404 && v["code"] == "not_found" && v["errors"][0]["field"] == "node_id",
        "removed already: {status} {v}"
    );
    Ok(())
}

/// An idle node is removed without force; `force` takes only `true` or `false`, and unknown
/// query parameters are refused (400, naming them); an unknown node is 404.
#[tokio::test]
async fn removing_an_idle_node_and_what_the_query_may_say() -> Result<()> {
    let f = Api::start().await?;
    for (query, field) in [
        ("force=yes", "force"),
        ("force=1", "force"),
        ("force=", "force"),
        ("forced=true", "forced"),
    ] {
        let (status, v) = f
            .request(Method::DELETE, &format!("/v1/nodes/fra-1?{query}"), None)
            .await?;
        ensure!(
            status == 400 && v["code"] == "malformed_request" && v["errors"][0]["field"] == field,
            "{query}: {status} {v}"
        );
    }
    let (status, v) = f
        .request(Method::DELETE, "/v1/nodes/no-such-node?force=false", None)
        .await?;
    ensure!(status == 404 && v["code"] == "not_found", "{status} {v}");

    let mut agent = FakeAgent::join(&f, "ams-1", "ams").await?;
    let (status, v) = f
        .request(Method::DELETE, "/v1/nodes/ams-1?force=false", None)
        .await?;
    ensure!(
        status == 200 && v["node"]["id"] == "ams-1" && v["node"]["running_runs"] == json!([]),
        "{status} {v}"
    );
    agent.closed().await?;
    ensure!(!listed(&f.get("/v1/nodes").await?, "ams-1"));
    Ok(())
}
