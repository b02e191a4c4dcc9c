//! `AgentService`: one bidirectional stream per connected agent.

use crate::engine::Scheduler;
use berth_core::store::Store;
use berth_proto::v1 as pb;
use berth_proto::v1::agent_message::Body;
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

pub struct AgentApi<S> {
    pub scheduler: Arc<Scheduler<S>>,
}

type Outbound = Pin<Box<dyn Stream<Item = Result<pb::SchedulerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> pb::agent_service_server::AgentService for AgentApi<S> {
    type AttachStream = Outbound;

    async fn attach(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let register = match inbound.message().await?.and_then(|m| m.body) {
            Some(Body::Register(r)) => r,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be Register",
                ))
            }
        };
        let node_id = register.node_id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let connection = self.scheduler.attach_node(register, tx.clone()).await?;
        // The reader records liveness the moment a message arrives, whatever it is and however
        // long the engine takes with the messages before it; the processor handles them in
        // order. A busy scheduler therefore never mistakes a healthy node for a lost one.
        let (queue, mut queued) = mpsc::unbounded_channel::<pb::AgentMessage>();
        let reader_scheduler = self.scheduler.clone();
        let reader_node = node_id.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(msg)) => {
                        reader_scheduler.touch(&reader_node, std::time::Instant::now());
                        if queue.send(msg).is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(node_id = %reader_node, error = %e, "agent stream failed");
                        break;
                    }
                }
            }
        });
        let scheduler = self.scheduler.clone();
        tokio::spawn(async move {
            while let Some(msg) = queued.recv().await {
                let seq = msg.seq;
                let handled = match msg.body {
                    Some(Body::Heartbeat(hb)) => {
                        scheduler.heartbeat(&node_id, hb).await;
                        Ok(())
                    }
                    Some(Body::RunStarted(m)) => scheduler.run_started(&node_id, m).await,
                    Some(Body::RunExited(m)) => scheduler.run_exited(&node_id, m).await,
                    Some(Body::LogBatch(b)) => scheduler.append_logs(&node_id, b).await,
                    Some(Body::WarmupResult(w)) => scheduler.warmup_result(&node_id, w).await,
                    Some(Body::PullProgress(p)) => {
                        scheduler.pull_progress(&node_id, p);
                        Ok(())
                    }
                    Some(Body::Register(_)) | None => {
                        tracing::warn!(node_id = %node_id, "unexpected message on an attached stream");
                        Ok(())
                    }
                };
                if let Err(e) = handled {
                    // Not acknowledged: end the stream so the agent reconnects and re-sends.
                    tracing::error!(node_id = %node_id, seq, error = %e, "could not handle agent message");
                    break;
                }
                if seq > 0 {
                    let ack = pb::SchedulerMessage {
                        body: Some(pb::scheduler_message::Body::Ack(pb::Ack { up_to_seq: seq })),
                    };
                    if tx.send(ack).is_err() {
                        break;
                    }
                }
            }
            scheduler.detach_node(&node_id, connection).await;
        });
        let outbound = UnboundedReceiverStream::new(rx).map(Ok);
        Ok(Response::new(Box::pin(outbound)))
    }
}
