//! One function per command: build the request from the parsed arguments, call the API, print
//! the answer (a table, or with `--json` the API's body as it is). Each returns the process's
//! exit code.

pub mod admin;
pub mod follow;
pub mod here;
pub mod tls;

use crate::args::{
    Cap, Command, CreateRegistry, CreateRunner, CreateSchedule, EnvPair, LogsArgs, NodesCommand,
    RegistriesCommand, RetryArgs, RunArgs, RunRef, RunnersCommand, RunsCommand, SchedulesCommand,
    UpdateRunner, WarmupArgs,
};
use crate::client::{Answer, Client, ClientError};
use crate::output::{self, detail};
use follow::{exit_code_for, interrupted, FinalState, Terminal, INTERRUPTED};
use serde_json::{json, Map, Value};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

pub const PASSWORD_VAR: &str = "BERTH_REGISTRY_PASSWORD";

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Input the command cannot use (checked before any request).
    #[error("{0}")]
    Input(String),
    /// The API answered, but not with what the command waits for.
    #[error("{0}")]
    Outcome(String),
}

/// Writes to stdout; a closed pipe (`berthctl … | head`) is not an error worth a message.
pub fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes());
    let _ = o.flush();
}

/// One line on stderr.
pub fn err_line(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

pub struct Ctx {
    pub client: Client,
    pub json: bool,
}

impl Ctx {
    /// The raw body with `--json`, else `human(body)`.
    fn show(&self, answer: &Answer, human: impl FnOnce(&Value) -> String) {
        if self.json {
            let raw = answer.raw.trim_end();
            if !raw.is_empty() {
                out(&format!("{raw}\n"));
            }
        } else {
            out(&human(&answer.json));
        }
    }

    /// For answers without a body (204): a sentence, or nothing with `--json`.
    fn done(&self, sentence: &str) {
        if !self.json {
            out(&format!("{sentence}\n"));
        }
    }
}

/// Ids go into paths; refuse what would change the path instead of naming a record.
fn id(what: &str, v: &str) -> Result<String, CommandError> {
    if v.is_empty() || v.contains(['/', '?', '#', '%']) || v.chars().any(char::is_whitespace) {
        return Err(CommandError::Input(format!("`{v}` is not a {what} id")));
    }
    Ok(v.to_owned())
}

pub async fn execute(ctx: &Ctx, command: Command) -> Result<u8, CommandError> {
    match command {
        Command::Runners(c) => runners(ctx, c).await,
        Command::Runs(RunsCommand::List {
            runner,
            limit,
            after,
            newest_first,
            status,
            region,
        }) => {
            let mut query = Vec::new();
            if let Some(limit) = limit {
                query.push(format!("limit={limit}"));
            }
            if let Some(after) = &after {
                query.push(format!("after={}", id("after", after)?));
            }
            let (path, again) = match &runner {
                Some(runner) => {
                    if status.is_some() || region.is_some() {
                        return Err(CommandError::Input(
                            "--status and --region list active runs across runners: omit RUNNER"
                                .to_owned(),
                        ));
                    }
                    if newest_first {
                        query.push("order=desc".to_owned());
                    }
                    let again = format!(
                        "berthctl runs list {runner}{}",
                        if newest_first { " --newest-first" } else { "" }
                    );
                    (format!("/v1/runners/{}/runs", id("runner", runner)?), again)
                }
                None => {
                    if newest_first {
                        return Err(CommandError::Input(
                            "--newest-first lists a runner's runs: give RUNNER".to_owned(),
                        ));
                    }
                    let mut again = "berthctl runs list".to_owned();
                    if let Some(status) = &status {
                        query.push(format!("status={status}"));
                        again.push_str(&format!(" --status {status}"));
                    }
                    if let Some(region) = &region {
                        query.push(format!("region={}", id("region", region)?));
                        again.push_str(&format!(" --region {region}"));
                    }
                    ("/v1/runs".to_owned(), again)
                }
            };
            let path = if query.is_empty() {
                path
            } else {
                format!("{path}?{}", query.join("&"))
            };
            let a = ctx.client.get(&path).await?;
            if runner.is_some() {
                ctx.show(&a, output::runs_table);
            } else {
                ctx.show(&a, output::active_runs_table);
            }
            if let (false, Some(next)) = (ctx.json, a.json["next_after"].as_str()) {
                err_line(&format!("more: {again} --after {next}"));
            }
            Ok(0)
        }
        Command::Runs(RunsCommand::Get(r)) => {
            let a = ctx.client.get(&run_path(&r)?).await?;
            ctx.show(&a, |v| detail(&v["run"], output::RUN_FIELDS));
            Ok(0)
        }
        Command::Run(a) if a.here => here::run_here(ctx, a).await,
        Command::Run(a) => run(ctx, a).await,
        Command::Logs(a) => logs(ctx, a).await,
        Command::Stop(r) => {
            let a = ctx
                .client
                .post(&format!("{}/stop", run_path(&r)?), None)
                .await?;
            ctx.show(&a, |v| detail(&v["run"], output::RUN_FIELDS));
            Ok(0)
        }
        Command::Warmup(a) => warmup(ctx, a).await,
        Command::Schedules(c) => schedules(ctx, c).await,
        Command::Nodes(c) => nodes(ctx, c).await,
        Command::Registries(c) => registries(ctx, c).await,
        Command::InstanceTypes => {
            let a = ctx.client.get("/v1/instance_types").await?;
            ctx.show(&a, output::instance_types_table);
            Ok(0)
        }
        Command::Regions => {
            let a = ctx.client.get("/v1/regions").await?;
            ctx.show(&a, output::regions_table);
            Ok(0)
        }
        Command::Admin(c) => admin::execute(ctx, c).await,
        Command::Usage(u) => {
            let mut query = vec![format!("group_by={}", u.group_by)];
            query.extend(u.from.map(|f| format!("from={f}")));
            query.extend(u.to.map(|t| format!("to={t}")));
            let a = ctx
                .client
                .get(&format!("/v1/usage?{}", query.join("&")))
                .await?;
            ctx.show(&a, output::usage_table);
            Ok(0)
        }
    }
}

fn run_path(r: &RunRef) -> Result<String, CommandError> {
    Ok(format!(
        "/v1/runners/{}/runs/{}",
        id("runner", &r.runner)?,
        id("run", &r.run)?
    ))
}

fn env_json(env: &[EnvPair]) -> Value {
    Value::Array(
        env.iter()
            .map(|e| json!({"env_key": e.key, "env_val": e.value}))
            .collect(),
    )
}

/// The `POST /v1/runners` body; fields not given are left out so the API applies its rules.
pub fn runner_body(c: &CreateRunner) -> Value {
    let mut b = Map::new();
    b.insert("name".into(), json!(c.name));
    b.insert("image_name".into(), json!(c.image.name));
    b.insert("image_tag".into(), json!(c.image.tag));
    if let Some(cmd) = &c.command {
        b.insert("run_command".into(), json!(cmd));
    }
    let argv = if c.argv.is_empty() {
        &c.trailing_argv
    } else {
        &c.argv
    };
    if !argv.is_empty() {
        b.insert("argv".into(), json!(argv));
    }
    let optional = [
        ("entrypoint", &c.entrypoint),
        ("region", &c.region),
        ("instance_type", &c.instance_type),
        ("container_registry_id", &c.registry),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            b.insert(k.into(), json!(v));
        }
    }
    if let Some(t) = c.timeout {
        b.insert("timeout_seconds".into(), json!(t));
    }
    if !c.env.is_empty() {
        b.insert("env_variables".into(), env_json(&c.env));
    }
    if let Some(n) = c.max_concurrent_runs {
        b.insert("max_concurrent_runs".into(), json!(n));
    }
    if let Some(policy) = retry_policy(&c.retry) {
        b.insert("retry_policy".into(), policy);
    }
    if let Some(url) = &c.notify_url {
        b.insert("notify_url".into(), json!(url));
    }
    if let Some(isolation) = &c.isolation {
        b.insert("isolation".into(), json!(isolation));
    }
    Value::Object(b)
}

/// Puts `notify_secret` into a runner body, from `--notify-secret-file` or `BERTH_NOTIFY_SECRET`
/// (never from the command line, where other users of the machine could read it).
fn add_notify_secret(body: &mut Value, file: Option<&std::path::Path>) -> Result<(), CommandError> {
    let inline = std::env::var("BERTH_NOTIFY_SECRET")
        .ok()
        .filter(|v| !v.is_empty());
    let url_given = body.get("notify_url").is_some_and(Value::is_string);
    let secret = match (file, inline) {
        (Some(path), _) => Some(std::fs::read_to_string(path).map_err(|e| {
            CommandError::Input(format!("--notify-secret-file {}: {e}", path.display()))
        })?),
        // From the environment only with a URL: an exported variable must not rotate the
        // secret on every update.
        (None, inline) => inline.filter(|_| url_given),
    };
    if let (Some(secret), Some(b)) = (secret, body.as_object_mut()) {
        b.insert("notify_secret".into(), json!(secret.trim()));
    }
    Ok(())
}

/// The `retry_policy` the flags give, if `--retry-attempts` is one of them.
pub fn retry_policy(r: &RetryArgs) -> Option<Value> {
    let attempts = r.retry_attempts?;
    let mut p = Map::new();
    p.insert("max_attempts".into(), json!(attempts));
    p.insert("retry_on".into(), json!(r.retry_on));
    if let Some(b) = r.retry_backoff {
        p.insert("backoff_seconds".into(), json!(b));
    }
    if !r.retry_exit_codes.is_empty() {
        p.insert("exit_codes".into(), json!(r.retry_exit_codes));
    }
    Some(Value::Object(p))
}

/// The `PATCH /v1/runners/{id}` body: only the settings given.
pub fn runner_patch(c: &UpdateRunner) -> Value {
    let mut b = Map::new();
    if let Some(image) = &c.image {
        b.insert("image_name".into(), json!(image.name));
        b.insert("image_tag".into(), json!(image.tag));
    }
    if let Some(cmd) = &c.command {
        b.insert("run_command".into(), json!(cmd));
    }
    if let Some(t) = c.timeout {
        b.insert("timeout_seconds".into(), json!(t));
    }
    match c.max_concurrent_runs {
        Some(Cap::Limit(n)) => {
            b.insert("max_concurrent_runs".into(), json!(n));
        }
        Some(Cap::None) => {
            b.insert("max_concurrent_runs".into(), Value::Null);
        }
        None => {}
    }
    if let Some(policy) = retry_policy(&c.retry) {
        b.insert("retry_policy".into(), policy);
    } else if c.no_retry {
        b.insert("retry_policy".into(), Value::Null);
    }
    if let Some(isolation) = &c.isolation {
        b.insert("isolation".into(), json!(isolation));
    }
    if let Some(url) = &c.notify_url {
        b.insert("notify_url".into(), json!(url));
    } else if c.no_notify {
        b.insert("notify_url".into(), Value::Null);
    }
    Value::Object(b)
}

/// The `POST /v1/runners/{id}/runs` body: only the overrides given.
/// The run's body; reads the `--file`s.
pub fn run_body(a: &RunArgs) -> Result<Value, CommandError> {
    use base64::Engine as _;
    let mut b = Map::new();
    if !a.files.is_empty() {
        let mut files = Vec::with_capacity(a.files.len());
        for f in &a.files {
            let content = std::fs::read(&f.local)
                .map_err(|e| CommandError::Input(format!("--file {}: {e}", f.local.display())))?;
            let mut item = Map::new();
            item.insert("path".into(), json!(f.path));
            item.insert(
                "content_base64".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(content)),
            );
            if let Some(mode) = f.mode {
                item.insert("mode".into(), json!(mode));
            }
            files.push(Value::Object(item));
        }
        b.insert("files".into(), Value::Array(files));
    }
    if let Some(grace) = a.stop_grace_seconds {
        b.insert("stop_grace_seconds".into(), json!(grace));
    }
    if let Some(policy) = retry_policy(&a.retry) {
        b.insert("retry_policy".into(), policy);
    }
    if !a.argv.is_empty() {
        b.insert("argv".into(), json!(a.argv));
    }
    if let Some(cmd) = &a.command {
        b.insert("command".into(), json!(cmd));
    }
    if let Some(ep) = &a.entrypoint {
        b.insert("entrypoint".into(), json!(ep));
    }
    if !a.env.is_empty() {
        b.insert("env_variables".into(), env_json(&a.env));
    }
    Ok(Value::Object(b))
}

async fn runners(ctx: &Ctx, c: RunnersCommand) -> Result<u8, CommandError> {
    match c {
        RunnersCommand::Create(c) => {
            let mut body = runner_body(&c);
            add_notify_secret(&mut body, c.notify_secret_file.as_deref())?;
            let a = ctx.client.post("/v1/runners", Some(&body)).await?;
            ctx.show(&a, |v| detail(&v["runner"], output::RUNNER_FIELDS));
        }
        RunnersCommand::List => {
            let a = ctx.client.get("/v1/runners").await?;
            ctx.show(&a, output::runners_table);
        }
        RunnersCommand::Get { id: runner } => {
            let a = ctx
                .client
                .get(&format!("/v1/runners/{}", id("runner", &runner)?))
                .await?;
            ctx.show(&a, |v| detail(&v["runner"], output::RUNNER_FIELDS));
        }
        RunnersCommand::Update(c) => {
            let mut body = runner_patch(&c);
            add_notify_secret(&mut body, c.notify_secret_file.as_deref())?;
            if body.as_object().is_some_and(Map::is_empty) {
                return Err(CommandError::Input(
                    "nothing to change: give at least one setting".to_owned(),
                ));
            }
            let a = ctx
                .client
                .patch(&format!("/v1/runners/{}", id("runner", &c.id)?), &body)
                .await?;
            ctx.show(&a, |v| detail(&v["runner"], output::RUNNER_FIELDS));
        }
        RunnersCommand::Delete { id: runner } => {
            ctx.client
                .delete(&format!("/v1/runners/{}", id("runner", &runner)?))
                .await?;
            ctx.done(&format!("deleted runner {runner}"));
        }
    }
    Ok(0)
}

/// The `POST /v1/runners/{id}/schedules` body.
pub fn schedule_body(c: &CreateSchedule) -> Value {
    let mut b = Map::new();
    b.insert("cron".into(), json!(c.cron));
    let words = [
        ("timezone", &c.timezone),
        ("overlap", &c.overlap),
        ("catch_up", &c.catch_up),
    ];
    for (k, v) in words {
        if let Some(v) = v {
            b.insert(k.into(), json!(v));
        }
    }
    if let Some(j) = c.jitter {
        b.insert("jitter_seconds".into(), json!(j));
    }
    let mut run = Map::new();
    if let Some(cmd) = &c.command {
        run.insert("command".into(), json!(cmd));
    }
    if !c.env.is_empty() {
        run.insert("env_variables".into(), env_json(&c.env));
    }
    if !run.is_empty() {
        b.insert("run".into(), Value::Object(run));
    }
    Value::Object(b)
}

async fn schedules(ctx: &Ctx, c: SchedulesCommand) -> Result<u8, CommandError> {
    let one = |runner: &str, sid: &str| -> Result<String, CommandError> {
        Ok(format!(
            "/v1/runners/{}/schedules/{}",
            id("runner", runner)?,
            id("schedule", sid)?
        ))
    };
    let show = |a: &Answer| ctx.show(a, |v| detail(&v["schedule"], output::SCHEDULE_FIELDS));
    match c {
        SchedulesCommand::Create(c) => {
            let path = format!("/v1/runners/{}/schedules", id("runner", &c.runner)?);
            show(&ctx.client.post(&path, Some(&schedule_body(&c))).await?);
        }
        SchedulesCommand::List { runner } => {
            let path = format!("/v1/runners/{}/schedules", id("runner", &runner)?);
            let a = ctx.client.get(&path).await?;
            ctx.show(&a, output::schedules_table);
        }
        SchedulesCommand::Get { runner, id: sid } => {
            show(&ctx.client.get(&one(&runner, &sid)?).await?);
        }
        SchedulesCommand::Pause { runner, id: sid } => {
            let body = json!({"paused": true});
            show(&ctx.client.patch(&one(&runner, &sid)?, &body).await?);
        }
        SchedulesCommand::Resume { runner, id: sid } => {
            let body = json!({"paused": false});
            show(&ctx.client.patch(&one(&runner, &sid)?, &body).await?);
        }
        SchedulesCommand::Delete { runner, id: sid } => {
            ctx.client.delete(&one(&runner, &sid)?).await?;
            ctx.done(&format!("deleted schedule {sid}"));
        }
    }
    Ok(0)
}

async fn run(ctx: &Ctx, a: RunArgs) -> Result<u8, CommandError> {
    let runner = id("runner", &a.runner)?;
    let created = ctx
        .client
        .post(&format!("/v1/runners/{runner}/runs"), Some(&run_body(&a)?))
        .await?;
    if !a.follow {
        ctx.show(&created, |v| detail(&v["run"], output::RUN_FIELDS));
        return Ok(0);
    }
    let run = created.json["run"]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| CommandError::Outcome(format!("no run id in {}", created.raw)))?;
    if ctx.json {
        out(&format!("{}\n", created.raw.trim_end()));
    }
    err_line(&format!("run {run} created"));
    let following = async {
        follow::wait_while_pending(&ctx.client, &runner, &run, !ctx.json).await?;
        follow::stream_logs(&ctx.client, &runner, &run, &mut Terminal { json: ctx.json }).await
    };
    tokio::select! {
        end = following => match end {
            Ok(s) => Ok(report_end(&ctx.client, &runner, &run, &s).await),
            Err(e) => Err(e),
        },
        () = interrupted() => {
            stop_after_interrupt(&ctx.client, &runner, &run).await;
            Ok(INTERRUPTED)
        }
    }
}

/// Says on stderr how a followed run ended, unless it simply succeeded, with the run's error
/// when it has one (e.g. the image could not be pulled); answers the exit code.
async fn report_end(client: &Client, runner: &str, run: &str, s: &FinalState) -> u8 {
    let code = exit_code_for(s);
    if s.status != "succeeded" {
        let exit = s
            .exit_code
            .map_or(String::new(), |c| format!(" with exit code {c}"));
        let why = match client
            .get(&format!("/v1/runners/{runner}/runs/{run}"))
            .await
        {
            Ok(a) => match (
                a.json["run"]["error_code"].as_str(),
                a.json["run"]["error_message"].as_str(),
            ) {
                (Some(c), Some(m)) if !m.is_empty() => format!(": {c}: {m}"),
                (Some(c), _) => format!(": {c}"),
                _ => String::new(),
            },
            Err(_) => String::new(),
        };
        err_line(&format!("run {}{exit}{why}", s.status));
    }
    code
}

/// Ctrl-C while following: stop the run; a second Ctrl-C gives up waiting for the stop.
async fn stop_after_interrupt(client: &Client, runner: &str, run: &str) {
    err_line(&format!(
        "interrupted: stopping run {run} (Ctrl-C again to leave it)"
    ));
    let path = format!("/v1/runners/{runner}/runs/{run}/stop");
    let stop = client.post(&path, None);
    tokio::select! {
        r = stop => match r {
            Ok(a) => err_line(&format!(
                "run {run} {}",
                a.json["run"]["status"].as_str().unwrap_or("stopped")
            )),
            Err(e) => err_line(&format!("could not stop run {run}: {e}")),
        },
        () = interrupted() => err_line(&format!("left run {run} stopping")),
    }
}

async fn logs(ctx: &Ctx, a: LogsArgs) -> Result<u8, CommandError> {
    let (runner, run) = (id("runner", &a.runner)?, id("run", &a.run)?);
    let mut sink = Terminal { json: ctx.json };
    if a.follow {
        // Watching only: Ctrl-C leaves the run alone.
        return tokio::select! {
            end = follow::stream_logs(&ctx.client, &runner, &run, &mut sink) => {
                match end {
                    Ok(s) => Ok(report_end(&ctx.client, &runner, &run, &s).await),
                    Err(e) => Err(e),
                }
            }
            () = interrupted() => Ok(INTERRUPTED),
        };
    }
    let mut after = 0u64;
    loop {
        let page = ctx
            .client
            .get(&format!(
                "/v1/runners/{runner}/runs/{run}/logs?after_id={after}&limit=1000"
            ))
            .await?;
        for line in page.json["logs"].as_array().into_iter().flatten() {
            follow::Sink::log(&mut sink, &line.to_string());
        }
        let next = page.json["next_after_id"].as_u64().unwrap_or(after);
        if page.json["has_more"] != json!(true) || next <= after {
            return Ok(0);
        }
        after = next;
    }
}

async fn warmup(ctx: &Ctx, a: WarmupArgs) -> Result<u8, CommandError> {
    let path = format!("/v1/runners/{}", id("runner", &a.runner)?);
    let body = (a.sandboxes > 0).then(|| serde_json::json!({ "sandboxes": a.sandboxes }));
    let mut answer = ctx
        .client
        .post(&format!("{path}/warmup"), body.as_ref())
        .await?;
    let deadline = Instant::now() + Duration::from_secs(a.wait_seconds);
    let mut said = false;
    loop {
        let r = &answer.json["runner"];
        match r["warmup_status"].as_str() {
            Some("ready") => {
                ctx.show(&answer, |_| {
                    let sandboxes = match r["warm_sandboxes"].as_u64() {
                        Some(n) if n > 0 => format!(", keeping {n} ready sandbox(es)"),
                        _ => String::new(),
                    };
                    format!(
                        "runner {} is warm on node {}{sandboxes}\n",
                        a.runner,
                        output::cell(&r["warm_node_id"])
                    )
                });
                return Ok(0);
            }
            Some("failed") => {
                if ctx.json {
                    ctx.show(&answer, |_| String::new());
                }
                err_line(&format!(
                    "warmup of runner {} failed: {}",
                    a.runner,
                    output::cell(&r["warmup_error"])
                ));
                return Ok(1);
            }
            _ => {}
        }
        if !said {
            err_line(&format!("warming up runner {}…", a.runner));
            said = true;
        }
        if Instant::now() >= deadline {
            return Err(CommandError::Outcome(format!(
                "runner {} still not warm after {} s",
                a.runner, a.wait_seconds
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        answer = match ctx.client.get(&path).await {
            Ok(a) => a,
            Err(e) if follow::is_transient(&e) => continue,
            Err(e) => return Err(e.into()),
        };
    }
}

async fn nodes(ctx: &Ctx, c: NodesCommand) -> Result<u8, CommandError> {
    let path = match c {
        NodesCommand::List => {
            let a = ctx.client.get("/v1/nodes").await?;
            ctx.show(&a, output::nodes_table);
            return Ok(0);
        }
        NodesCommand::Drain { id: n } => format!("/v1/nodes/{}/drain", id("node", &n)?),
        NodesCommand::Resume { id: n } => format!("/v1/nodes/{}/resume", id("node", &n)?),
        NodesCommand::Remove { id: n, force } => {
            let a = ctx.client.delete(&remove_path(&n, force)?).await?;
            ctx.show(&a, output::removed_node);
            return Ok(0);
        }
    };
    let a = ctx.client.post(&path, None).await?;
    ctx.show(&a, |v| detail(&v["node"], output::NODE_FIELDS));
    Ok(0)
}

/// `DELETE /v1/nodes/{id}`, with `force=true` when forced.
fn remove_path(node: &str, force: bool) -> Result<String, CommandError> {
    let path = format!("/v1/nodes/{}", id("node", node)?);
    Ok(if force {
        format!("{path}?force=true")
    } else {
        path
    })
}

/// The registry password: stdin with `--password-stdin` (one trailing newline dropped), else the
/// environment variable; never a flag, so it stays out of shell history and `ps`.
pub fn registry_password(
    from_stdin: bool,
    read_stdin: impl FnOnce() -> std::io::Result<String>,
    env: Option<String>,
) -> Result<String, CommandError> {
    if from_stdin {
        let text = read_stdin().map_err(|e| {
            CommandError::Input(format!("cannot read the password from stdin: {e}"))
        })?;
        let text = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(&text);
        if text.is_empty() {
            return Err(CommandError::Input(
                "the password on stdin is empty".to_owned(),
            ));
        }
        return Ok(text.to_owned());
    }
    env.filter(|p| !p.is_empty()).ok_or_else(|| {
        CommandError::Input(format!(
            "no registry password: pipe it to --password-stdin or set {PASSWORD_VAR}"
        ))
    })
}

async fn registries(ctx: &Ctx, c: RegistriesCommand) -> Result<u8, CommandError> {
    const PATH: &str = "/v1/container_registries";
    match c {
        RegistriesCommand::Create(CreateRegistry {
            name,
            host,
            username,
            password_stdin,
        }) => {
            let password = registry_password(
                password_stdin,
                || {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s).map(|_| s)
                },
                std::env::var(PASSWORD_VAR).ok(),
            )?;
            let body =
                json!({"name": name, "host": host, "username": username, "password": password});
            let a = ctx.client.post(PATH, Some(&body)).await?;
            ctx.show(&a, |v| {
                detail(&v["container_registry"], output::REGISTRY_FIELDS)
            });
        }
        RegistriesCommand::List => {
            let a = ctx.client.get(PATH).await?;
            ctx.show(&a, output::registries_table);
        }
        RegistriesCommand::Get { id: r } => {
            let a = ctx
                .client
                .get(&format!("{PATH}/{}", id("container registry", &r)?))
                .await?;
            ctx.show(&a, |v| {
                detail(&v["container_registry"], output::REGISTRY_FIELDS)
            });
        }
        RegistriesCommand::Delete { id: r } => {
            ctx.client
                .delete(&format!("{PATH}/{}", id("container registry", &r)?))
                .await?;
            ctx.done(&format!("deleted container registry {r}"));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser;

    fn cli(args: &[&str]) -> Option<Command> {
        Cli::try_parse_from(std::iter::once("berthctl").chain(args.iter().copied()))
            .ok()
            .map(|c| c.command)
    }

    #[test]
    fn runner_bodies_carry_only_what_was_given() {
        let Some(Command::Runners(RunnersCommand::Create(c))) = cli(&[
            "runners",
            "create",
            "--name",
            "hello",
            "--image",
            "reg:5000/app:v1",
            "--region",
            "fra",
            "--timeout",
            "0",
            "-e",
            "A=1",
            "--",
            "sh",
            "-c",
            "echo hi",
        ]) else {
            panic!("does not parse");
        };
        assert_eq!(
            runner_body(&c),
            json!({
                "name": "hello", "image_name": "reg:5000/app", "image_tag": "v1",
                "argv": ["sh", "-c", "echo hi"], "region": "fra", "timeout_seconds": 0,
                "env_variables": [{"env_key": "A", "env_val": "1"}],
            })
        );
    }

    #[test]
    fn run_bodies() {
        let Some(Command::Run(a)) = cli(&["run", "r", "--command", "echo hi", "-e", "X="]) else {
            panic!("does not parse");
        };
        assert_eq!(
            run_body(&a).ok(),
            Some(json!({"command": "echo hi", "env_variables": [{"env_key": "X", "env_val": ""}]}))
        );
        let Some(Command::Run(a)) = cli(&["run", "r"]) else {
            panic!("does not parse");
        };
        assert_eq!(run_body(&a).ok(), Some(json!({})));
    }

    #[test]
    fn run_files_are_read_and_sent_as_base64() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = dir.path().join("conf");
        std::fs::write(&local, "a=1\n").expect("write");
        let arg = format!("{}:/etc/app/conf:0600", local.display());
        let Some(Command::Run(a)) = cli(&["run", "r", "--file", &arg, "--stop-grace-seconds", "9"])
        else {
            panic!("does not parse");
        };
        assert_eq!(
            run_body(&a).ok(),
            Some(json!({
                "files": [{"path": "/etc/app/conf", "content_base64": "YT0xCg==", "mode": 0o600}],
                "stop_grace_seconds": 9,
            }))
        );
        let missing = format!("{}:/etc/x", dir.path().join("nope").display());
        let Some(Command::Run(a)) = cli(&["run", "r", "--file", &missing]) else {
            panic!("does not parse");
        };
        assert!(matches!(run_body(&a), Err(CommandError::Input(m)) if m.contains("nope")));
    }

    #[test]
    fn passwords_come_from_stdin_or_the_environment() {
        let stdin = |s: &'static str| move || Ok(s.to_owned());
        assert_eq!(
            registry_password(true, stdin("s3cret\r\n"), Some("env".into())).ok(),
            Some("s3cret".to_owned())
        );
        assert_eq!(
            registry_password(false, stdin("unused"), Some("env".into())).ok(),
            Some("env".to_owned())
        );
        let missing = registry_password(false, stdin(""), None).map_err(|e| e.to_string());
        assert!(
            missing
                .as_ref()
                .is_err_and(|e| e.contains(PASSWORD_VAR) && e.contains("--password-stdin")),
            "{missing:?}"
        );
        assert!(registry_password(true, stdin("\n"), None).is_err());
    }

    #[test]
    fn nodes_remove_sends_force_only_when_asked() {
        let path = |args: &[&str]| match cli(args) {
            Some(Command::Nodes(NodesCommand::Remove { id: n, force })) => {
                remove_path(&n, force).ok()
            }
            _ => None,
        };
        assert_eq!(
            path(&["nodes", "remove", "fra-2"]).as_deref(),
            Some("/v1/nodes/fra-2")
        );
        assert_eq!(
            path(&["nodes", "remove", "fra-2", "--force"]).as_deref(),
            Some("/v1/nodes/fra-2?force=true")
        );
        assert_eq!(
            path(&["nodes", "remove", "a?force=true"]),
            None,
            "not a node id"
        );
        assert!(cli(&["nodes", "remove"]).is_none(), "needs the node");
    }

    #[test]
    fn ids_cannot_change_the_path() {
        assert!(id("run", "0190-abc").is_ok());
        assert!(id("run", "../nodes").is_err());
        assert!(id("run", "a?b").is_err());
        assert!(id("run", "").is_err());
    }
}
