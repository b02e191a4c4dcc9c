//! `--network none` (here through the agent's `BERTH_AGENT_NETWORK`, which agents inherit from
//! this test binary): runs get an empty network namespace — loopback only — and the agent makes
//! no namespace files and reserves no address for them.

mod common;

use anyhow::{ensure, Result};
use common::{msgs, AgentSpec, Fleet};
use serde_json::json;
use std::path::Path;

#[tokio::test]
async fn with_network_none_a_run_has_only_loopback() -> Result<()> {
    std::env::set_var("BERTH_AGENT_NETWORK", "none");
    let f = Fleet::start(&[AgentSpec::new("fra")]).await?;
    let node = f.node("fra").to_owned();
    let runner = f.runner("fra", json!({"timeout_seconds": 30})).await?;
    let run = f
        .start_run(
            &runner,
            // Routes through anything but loopback (gVisor, run with BERTH_TEST_ISOLATION=
            // sandbox, lists its loopback routes where runc's empty namespace lists none).
            json!({"command": "ip -o link | cut -d: -f2; ip route | grep -vc ' dev lo'; sleep 1"}),
        )
        .await?;
    f.wait_for(&runner, &run, std::time::Duration::from_secs(30), |s| {
        s != "pending"
    })
    .await?;
    ensure!(
        !Path::new("/run/berth/netns")
            .join(&node)
            .join(&run)
            .exists(),
        "no namespace file for the run"
    );
    let r = f.wait_finished(&runner, &run).await?;
    let out = msgs(&f.all_logs(&runner, &run).await?, "stdout");
    ensure!(r["status"] == "succeeded", "{r}\n{}", f.logs());
    let links: Vec<&str> = out.iter().take(out.len() - 1).map(|l| l.trim()).collect();
    ensure!(links == ["lo"], "only loopback: {out:?}");
    ensure!(
        out.last().map(String::as_str) == Some("0"),
        "no routes but loopback's: {out:?}"
    );
    Ok(())
}
