mod common;
use anyhow::Result;
use common::{msgs, AgentSpec, Fleet};
use serde_json::json;

#[tokio::test]
async fn scratch() -> Result<()> {
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let l = std::net::TcpListener::bind("[::]:0")?;
    let port = l.local_addr()?.port();
    let runner = f.runner("fra", json!({"timeout_seconds": 60})).await?;
    let cmd = std::env::var("SCRATCH_CMD")?.replace("PORT", &port.to_string());
    let run = f.start_run(&runner, json!({"command": cmd})).await?;
    let r = f.wait_finished(&runner, &run).await?;
    let logs = f.all_logs(&runner, &run).await?;
    eprintln!(
        "STATUS {} {}\nOUT {:#?}\nERR {:#?}",
        r["status"],
        r["exit_code"],
        msgs(&logs, "stdout"),
        msgs(&logs, "stderr")
    );
    Ok(())
}
