//! The command line: clap's derive types and the parsers for values the API needs split
//! (`IMAGE[:TAG]`, `KEY=value`). Anything malformed here is a usage error (exit 2) before a
//! request is sent.

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "berthctl",
    version,
    about = "Command-line client of the Berth container scheduler",
    after_help = "Configuration: --url/--token, else the BERTH_URL/BERTH_TOKEN environment \
                  variables, else a .berth/env file in this directory or a parent."
)]
pub struct Cli {
    /// The API's base URL, e.g. http://127.0.0.1:8080 [default: $BERTH_URL, then .berth/env]
    #[arg(long, global = true, value_name = "URL", display_order = 900)]
    pub url: Option<String>,
    /// The API's bearer token [default: $BERTH_TOKEN, then .berth/env]
    #[arg(long, global = true, value_name = "TOKEN", display_order = 901)]
    pub token: Option<String>,
    /// Print the API's JSON as it is instead of tables
    #[arg(long, global = true, display_order = 902)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list, show and delete runners
    #[command(subcommand)]
    Runners(RunnersCommand),
    /// List and show the runs of a runner
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Start a run of a runner (and with --follow, stream it and exit with its exit code)
    Run(RunArgs),
    /// Print a run's log lines (stdout lines on stdout, stderr lines on stderr)
    Logs(LogsArgs),
    /// Stop a run
    Stop(RunRef),
    /// Pull a runner's image onto a node ahead of its runs, and wait for the outcome
    Warmup(WarmupArgs),
    /// A runner's schedules: cron expressions in a time zone that start its runs
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// List nodes, drain, resume and remove them
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Manage private container registries
    #[command(subcommand)]
    Registries(RegistriesCommand),
    /// List the instance types runners may use
    InstanceTypes,
    /// List the regions runners may use
    Regions,
    /// Billed usage of the runs that ended in a period
    Usage(UsageArgs),
    /// Operator commands (they need the admin token)
    #[command(subcommand)]
    Admin(AdminCommand),
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create, list and revoke projects' API keys
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Enroll and revoke nodes
    #[command(subcommand)]
    Nodes(AdminNodesCommand),
    /// The fleet's TLS certificates (offline: needs no API)
    #[command(subcommand)]
    Tls(TlsCommand),
}

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Create the fleet's CA and the schedulers' certificate in a directory: ca.pem for the API
    /// and agents (--tls-ca), scheduler.pem/.key for the schedulers (--tls-cert/--tls-key)
    Init {
        /// Where to write the files (keys 0600)
        #[arg(long)]
        dir: std::path::PathBuf,
        /// A name or IP address clients use to reach a scheduler (repeatable)
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Replace an existing CA (clients must then trust the new ca.pem)
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminNodesCommand {
    /// Registration tokens: what a new node's agent exchanges for its own credential
    #[command(subcommand)]
    Token(TokenCommand),
    /// Revoke a node: disconnect it now; runs it had not started are queued again, started
    /// ones end `node_lost`; its agent cannot come back without a new registration token
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a registration token for a region and print it (the only time it is shown)
    Create {
        /// The region the enrolled nodes register in
        #[arg(long)]
        region: String,
        /// A label, e.g. the pool or machine it is for
        #[arg(long)]
        name: Option<String>,
        /// How long it can enroll nodes (default 3600; at most 30 days)
        #[arg(long, value_name = "SECONDS")]
        expires_in: Option<u64>,
        /// Refuse it after it enrolled one node
        #[arg(long)]
        single_use: bool,
    },
    /// List registration tokens (never their secrets)
    List,
    /// Revoke a registration token: no node enrolls with it any more
    Revoke { token_id: String },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key for a project and print it (the only time it is shown)
    Create {
        /// The project the key acts in: a-z, 0-9 and `-`, up to 63 characters
        #[arg(long)]
        project: String,
        /// A label for the key, e.g. who or what uses it
        #[arg(long)]
        name: Option<String>,
    },
    /// List API keys (never their secrets)
    List {
        /// Only this project's keys
        #[arg(long)]
        project: Option<String>,
    },
    /// Revoke an API key: its next request is refused
    Revoke {
        /// The key's id (the part after `berth_`, before the next `_`)
        key_id: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct UsageArgs {
    /// Start of the period: YYYY-MM-DD or an RFC 3339 timestamp (default: 30 days before --to)
    #[arg(long)]
    pub from: Option<String>,
    /// End of the period, exclusive (default: now)
    #[arg(long)]
    pub to: Option<String>,
    /// runner, instance_type or day
    #[arg(long, default_value = "runner")]
    pub group_by: String,
}

#[derive(Debug, Subcommand)]
pub enum RunnersCommand {
    /// Create a runner
    Create(Box<CreateRunner>),
    /// List runners
    List,
    /// Show one runner
    Get { id: String },
    /// Change a runner (only the settings given)
    Update(Box<UpdateRunner>),
    /// Delete a runner
    Delete { id: String },
}

#[derive(Debug, Args)]
pub struct CreateRunner {
    /// The runner's name (3 to 50 characters)
    #[arg(long)]
    pub name: String,
    /// IMAGE[:TAG] or IMAGE@sha256:DIGEST; the tag defaults to `latest`
    #[arg(long, value_parser = parse_image, value_name = "IMAGE[:TAG]")]
    pub image: Image,
    /// A shell command (run with `sh -c`)
    #[arg(long, conflicts_with_all = ["argv", "trailing_argv"])]
    pub command: Option<String>,
    /// The program and its arguments, taking every argument after it (or give them after `--`)
    #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "ARG", conflicts_with = "trailing_argv")]
    pub argv: Vec<String>,
    /// Replaces the image's ENTRYPOINT
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Where its runs are placed (see `berthctl regions`)
    #[arg(long)]
    pub region: Option<String>,
    /// Memory and CPU of its runs (see `berthctl instance-types`)
    #[arg(long)]
    pub instance_type: Option<String>,
    /// The run timeout in seconds (the API's default when absent)
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub timeout: Option<i64>,
    /// An environment variable, KEY=value (repeatable)
    #[arg(long, short = 'e', value_parser = parse_env, value_name = "KEY=VALUE")]
    pub env: Vec<EnvPair>,
    /// The id of the container registry holding the image
    #[arg(long, value_name = "ID")]
    pub registry: Option<String>,
    /// The most runs of this runner on nodes at once (1-10000); later runs wait in the queue
    #[arg(long, value_name = "N")]
    pub max_concurrent_runs: Option<u32>,
    #[command(flatten)]
    pub retry: RetryArgs,
    /// Where a signed JSON event goes when one of the runner's runs ends (http:// or https://)
    #[arg(long, value_name = "URL")]
    pub notify_url: Option<String>,
    /// A file holding the secret that signs those events (16-256 characters; or set
    /// BERTH_NOTIFY_SECRET); never shown again
    #[arg(long, value_name = "FILE")]
    pub notify_secret_file: Option<std::path::PathBuf>,
    /// How runs are isolated: container (runc, the default) or sandbox (gVisor, for untrusted
    /// code; only nodes with runsc take them)
    #[arg(long, value_parser = ["container", "sandbox"], value_name = "container|sandbox")]
    pub isolation: Option<String>,
    #[arg(last = true, value_name = "ARGV", hide = true)]
    pub trailing_argv: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum SchedulesCommand {
    /// Create a schedule
    Create(CreateSchedule),
    /// List a runner's schedules
    List { runner: String },
    /// Show one schedule
    Get { runner: String, id: String },
    /// Stop a schedule firing (until resumed)
    Pause { runner: String, id: String },
    /// Fire again, from the next time on
    Resume { runner: String, id: String },
    /// Delete a schedule (its runs stay)
    Delete { runner: String, id: String },
}

#[derive(Debug, Args)]
pub struct CreateSchedule {
    /// The runner's id
    pub runner: String,
    /// A cron expression: 5 fields, or 6 with seconds first (`0 3 * * MON-FRI`)
    #[arg(long)]
    pub cron: String,
    /// The IANA time zone it is read in (default UTC)
    #[arg(long, value_name = "ZONE")]
    pub timezone: Option<String>,
    /// While an earlier run of it has not ended: allow, forbid (skip the fire), replace
    #[arg(long, value_name = "POLICY")]
    pub overlap: Option<String>,
    /// Fires missed while the control plane was down: skip, run_once
    #[arg(long, value_name = "POLICY")]
    pub catch_up: Option<String>,
    /// Up to this many seconds late, to spread schedules sharing a time (0-3600)
    #[arg(long, value_name = "SECONDS")]
    pub jitter: Option<u32>,
    /// A shell command each fire's run gets instead of the runner's
    #[arg(long)]
    pub command: Option<String>,
    /// An environment variable each fire's run gets, KEY=value (repeatable)
    #[arg(long, short = 'e', value_parser = parse_env, value_name = "KEY=VALUE")]
    pub env: Vec<EnvPair>,
}

#[derive(Debug, Args)]
pub struct UpdateRunner {
    /// The runner's id
    pub id: String,
    /// IMAGE[:TAG] or IMAGE@sha256:DIGEST
    #[arg(long, value_parser = parse_image, value_name = "IMAGE[:TAG]")]
    pub image: Option<Image>,
    /// A shell command (run with `sh -c`), replacing the runner's command
    #[arg(long)]
    pub command: Option<String>,
    /// The run timeout in seconds
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub timeout: Option<i64>,
    /// The most runs of this runner on nodes at once (1-10000), or `none` to remove the cap
    #[arg(long, value_parser = parse_cap, value_name = "N|none")]
    pub max_concurrent_runs: Option<Cap>,
    #[command(flatten)]
    pub retry: RetryArgs,
    /// Remove the runner's retry policy
    #[arg(long, conflicts_with = "retry_attempts")]
    pub no_retry: bool,
    /// Where a signed JSON event goes when one of the runner's runs ends (http:// or https://)
    #[arg(long, value_name = "URL")]
    pub notify_url: Option<String>,
    /// A file holding the secret that signs those events (16-256 characters; or set
    /// BERTH_NOTIFY_SECRET); never shown again
    #[arg(long, value_name = "FILE")]
    pub notify_secret_file: Option<std::path::PathBuf>,
    /// Send no more run-ended events (removes the URL and the secret)
    #[arg(long, conflicts_with_all = ["notify_url", "notify_secret_file"])]
    pub no_notify: bool,
    /// How runs are isolated from now on: container (runc) or sandbox (gVisor)
    #[arg(long, value_parser = ["container", "sandbox"], value_name = "container|sandbox")]
    pub isolation: Option<String>,
}

/// A retry policy (`retry_policy`), given with `--retry-attempts`.
#[derive(Debug, Args, Default)]
pub struct RetryArgs {
    /// Attempts in all, the first included (1-10): failed runs are tried again
    #[arg(long, value_name = "N")]
    pub retry_attempts: Option<u32>,
    /// The endings that retry, comma-separated: exit_code, node_lost, oom_killed,
    /// image_pull_failed, timeout
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "CAUSES",
        requires = "retry_attempts"
    )]
    pub retry_on: Vec<String>,
    /// Seconds before the second attempt (then doubled each time)
    #[arg(long, value_name = "SECONDS", requires = "retry_attempts")]
    pub retry_backoff: Option<u32>,
    /// Only these exit codes retry (with exit_code in --retry-on), comma-separated
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "CODES",
        requires = "retry_attempts"
    )]
    pub retry_exit_codes: Vec<i32>,
}

/// A concurrency cap, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Limit(u32),
    None,
}

fn parse_cap(s: &str) -> Result<Cap, String> {
    if s == "none" {
        return Ok(Cap::None);
    }
    s.parse()
        .map(Cap::Limit)
        .map_err(|_| format!("`{s}` is neither a number of runs nor `none`"))
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List a runner's runs; without a runner, the runs that have not ended across runners
    /// (the queue, with positions and reasons, and what runs now)
    List {
        /// The runner's id (omit it to list pending and running runs across runners)
        runner: Option<String>,
        /// At most this many runs (1-1000; default 100)
        #[arg(long)]
        limit: Option<u32>,
        /// Only runs after this one in the listing's order (a page's `next_after`)
        #[arg(long, value_name = "RUN_ID")]
        after: Option<String>,
        /// Newest first (a runner's runs)
        #[arg(long, conflicts_with = "status")]
        newest_first: bool,
        /// Only `pending` or `running` runs, across runners (without RUNNER)
        #[arg(long, value_parser = ["pending", "running"])]
        status: Option<String>,
        /// Only this region's runs (without RUNNER)
        #[arg(long)]
        region: Option<String>,
    },
    /// Show one run
    Get(RunRef),
}

#[derive(Debug, Args)]
pub struct RunRef {
    /// The runner's id
    pub runner: String,
    /// The run's id
    pub run: String,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The runner's id
    pub runner: String,
    /// An environment variable for this run, KEY=value (repeatable)
    #[arg(long, short = 'e', value_parser = parse_env, value_name = "KEY=VALUE")]
    pub env: Vec<EnvPair>,
    /// A shell command replacing the runner's
    #[arg(long, conflicts_with = "argv")]
    pub command: Option<String>,
    /// Replaces the entrypoint for this run
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// A local file placed read-only in the run's container: LOCAL:/ABSOLUTE/PATH[:MODE], MODE
    /// in octal (default 0444) (repeatable)
    #[arg(long = "file", value_parser = parse_file, value_name = "LOCAL:PATH[:MODE]")]
    pub files: Vec<FileArg>,
    /// Seconds between SIGTERM and SIGKILL when this run is stopped or times out (1-300)
    #[arg(long, value_name = "SECONDS")]
    pub stop_grace_seconds: Option<u32>,
    /// This run's own retry policy, replacing the runner's (`--retry-attempts 1`: never retry)
    #[command(flatten)]
    pub retry: RetryArgs,
    /// Wait for the run, stream its logs, and exit with its exit code (Ctrl-C stops the run)
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Run it on this machine, as an ephemeral node of the fleet (e.g. in a CI job): starts
    /// berth-node-agent in one-shot mode for this run only (this machine's containerd, the
    /// same isolation), follows it like --follow and exits with its exit code. The agent
    /// enrolls with BERTH_REGISTRATION_TOKEN (or --registration-token-file), a token of the
    /// runner's region; its other settings come from its BERTH_AGENT_* environment.
    #[arg(long, conflicts_with = "retry_attempts")]
    pub here: bool,
    /// With --here: the schedulers' gRPC addresses for the agent (default: its
    /// BERTH_AGENT_SCHEDULER, else http://127.0.0.1:7070)
    #[arg(long, requires = "here", value_name = "URLS")]
    pub scheduler: Option<String>,
    /// With --here: a file holding the registration token the agent enrolls with
    #[arg(long, requires = "here", value_name = "FILE")]
    pub registration_token_file: Option<std::path::PathBuf>,
    /// With --here: where the agent keeps its state for this run (default:
    /// /var/lib/berth/eph-<run id>; removed once the agent has left)
    #[arg(long, requires = "here", value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    /// With --here: the berth-node-agent program (default: the one beside berthctl, else PATH)
    #[arg(long, requires = "here", value_name = "PATH")]
    pub agent_bin: Option<std::path::PathBuf>,
    /// The program and its arguments replacing the runner's command
    #[arg(last = true, value_name = "ARGV")]
    pub argv: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The runner's id
    pub runner: String,
    /// The run's id
    pub run: String,
    /// Stream new lines until the run ends, then exit with its exit code
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct WarmupArgs {
    /// The runner's id
    pub runner: String,
    /// Ready sandboxes the warm node keeps for the runner (0-16): containers created ahead,
    /// so a run with no overrides only has to start its process
    #[arg(long, default_value_t = 0)]
    pub sandboxes: u32,
    /// Give up waiting after this long
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    pub wait_seconds: u64,
}

#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// List nodes
    List,
    /// Stop placing new runs on a node (its running runs finish)
    Drain { id: String },
    /// Place runs on a drained node again
    Resume { id: String },
    /// Remove a node from the fleet: its credentials are revoked, its agent disconnected, its
    /// record deleted (it is no longer listed). Refused while it is connected and holds runs:
    /// drain it and wait for them, or --force
    Remove {
        id: String,
        /// Remove it even while it holds runs: runs it had not started are queued again,
        /// started ones end node_lost
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RegistriesCommand {
    /// Add a registry's credentials
    Create(CreateRegistry),
    /// List registries (passwords are never shown)
    List,
    /// Show one registry
    Get { id: String },
    /// Delete a registry
    Delete { id: String },
}

#[derive(Debug, Args)]
pub struct CreateRegistry {
    /// A name for the registry's credentials
    #[arg(long)]
    pub name: String,
    /// host[:port], e.g. registry.example.com
    #[arg(long)]
    pub host: String,
    /// The user to log in as
    #[arg(long)]
    pub username: String,
    /// Read the password from stdin (otherwise from $BERTH_REGISTRY_PASSWORD)
    #[arg(long)]
    pub password_stdin: bool,
}

/// An image reference split the way the API stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub name: String,
    pub tag: String,
}

/// `busybox` → (`busybox`, `latest`); `host:5000/team/app:1.2` → (`host:5000/team/app`, `1.2`);
/// `app@sha256:…` → (`app`, `sha256:…`). A colon before the last `/` is a registry port.
pub fn parse_image(s: &str) -> Result<Image, String> {
    let (name, tag) = if let Some((name, digest)) = s.split_once('@') {
        (name, digest)
    } else {
        let last_part = s.rfind('/').map_or(0, |i| i + 1);
        match s[last_part..].rfind(':') {
            Some(i) => (&s[..last_part + i], &s[last_part + i + 1..]),
            None => (s, "latest"),
        }
    };
    if name.is_empty() {
        return Err("the image name is empty".to_owned());
    }
    if tag.is_empty() {
        return Err("the tag after `:` or `@` is empty".to_owned());
    }
    Ok(Image {
        name: name.to_owned(),
        tag: tag.to_owned(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvPair {
    pub key: String,
    pub value: String,
}

/// `KEY=value`; the value may be empty or contain `=`.
/// `--file LOCAL:PATH[:MODE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileArg {
    pub local: std::path::PathBuf,
    pub path: String,
    /// Permission bits; None: the API's default (0444).
    pub mode: Option<u32>,
}

pub fn parse_file(s: &str) -> Result<FileArg, String> {
    let usage = || format!("expected LOCAL:/absolute/path[:MODE] (MODE in octal), got `{s}`");
    let (local, rest) = s.split_once(':').ok_or_else(usage)?;
    if local.is_empty() || !rest.starts_with('/') {
        return Err(usage());
    }
    let (path, mode) = match rest.rsplit_once(':') {
        Some((path, mode)) => {
            let mode = u32::from_str_radix(mode, 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| {
                    format!("MODE must be octal permission bits (e.g. 0644), got `{mode}`")
                })?;
            (path, Some(mode))
        }
        None => (rest, None),
    };
    Ok(FileArg {
        local: local.into(),
        path: path.to_owned(),
        mode,
    })
}

pub fn parse_env(s: &str) -> Result<EnvPair, String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok(EnvPair {
            key: key.to_owned(),
            value: value.to_owned(),
        }),
        _ => Err(format!("expected KEY=value, got `{s}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, tag: &str) -> Result<Image, String> {
        Ok(Image {
            name: name.to_owned(),
            tag: tag.to_owned(),
        })
    }

    #[test]
    fn files_are_local_colon_path_with_an_optional_octal_mode() {
        assert_eq!(
            parse_file("conf.json:/etc/app/conf.json"),
            Ok(FileArg {
                local: "conf.json".into(),
                path: "/etc/app/conf.json".into(),
                mode: None
            })
        );
        assert_eq!(
            parse_file("./run.sh:/work/run.sh:0755").map(|f| (f.path, f.mode)),
            Ok(("/work/run.sh".to_owned(), Some(0o755)))
        );
        for bad in [
            "",
            "x",
            ":/a",
            "x:relative",
            "x:/a:999",
            "x:/a:rw",
            "x:/a:1000",
        ] {
            assert!(parse_file(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn images_split_into_name_and_tag() {
        assert_eq!(parse_image("busybox"), image("busybox", "latest"));
        assert_eq!(parse_image("busybox:1.36"), image("busybox", "1.36"));
        assert_eq!(
            parse_image("127.0.0.1:5000/team/app"),
            image("127.0.0.1:5000/team/app", "latest")
        );
        assert_eq!(
            parse_image("127.0.0.1:5000/team/app:v2"),
            image("127.0.0.1:5000/team/app", "v2")
        );
        let digest = format!("sha256:{}", "0".repeat(64));
        assert_eq!(parse_image(&format!("app@{digest}")), image("app", &digest));
        assert!(parse_image("").is_err());
        assert!(parse_image("busybox:").is_err());
        assert!(parse_image(":tag").is_err());
    }

    #[test]
    fn env_pairs() {
        assert_eq!(
            parse_env("A=b=c"),
            Ok(EnvPair {
                key: "A".into(),
                value: "b=c".into()
            })
        );
        assert_eq!(parse_env("EMPTY=").map(|e| e.value), Ok(String::new()));
        assert!(parse_env("NOVALUE").is_err());
        assert!(parse_env("=x").is_err());
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("berthctl").chain(args.iter().copied()))
    }

    #[test]
    fn run_takes_argv_after_the_double_dash() -> Result<(), clap::Error> {
        let cli = parse(&[
            "run", "r1", "--follow", "-e", "A=1", "--", "sh", "-c", "exit 7",
        ])?;
        let Command::Run(a) = cli.command else {
            panic!("not a run: {cli:?}");
        };
        assert_eq!(a.argv, ["sh", "-c", "exit 7"]);
        assert!(a.follow);
        assert_eq!(a.env[0].key, "A");
        Ok(())
    }

    #[test]
    fn runner_argv_by_flag_or_double_dash() -> Result<(), clap::Error> {
        let base = ["runners", "create", "--name", "n", "--image", "busybox"];
        let with_flag: Vec<&str> = base
            .iter()
            .copied()
            .chain(["--timeout", "0", "--argv", "sh", "-c", "echo hi"])
            .collect();
        let Command::Runners(RunnersCommand::Create(c)) = parse(&with_flag)?.command else {
            panic!("not a create");
        };
        assert_eq!(c.argv, ["sh", "-c", "echo hi"]);
        assert_eq!(c.timeout, Some(0));
        assert_eq!(
            c.image,
            Image {
                name: "busybox".into(),
                tag: "latest".into()
            }
        );
        let with_dash: Vec<&str> = base.iter().copied().chain(["--", "echo", "hi"]).collect();
        let Command::Runners(RunnersCommand::Create(c)) = parse(&with_dash)?.command else {
            panic!("not a create");
        };
        assert_eq!(c.trailing_argv, ["echo", "hi"]);
        Ok(())
    }

    #[test]
    fn caps_and_retry_policies_become_their_json() -> Result<(), clap::Error> {
        use crate::commands::{run_body, runner_body, runner_patch};
        let create = parse(&[
            "runners",
            "create",
            "--name",
            "n",
            "--image",
            "b",
            "--max-concurrent-runs",
            "5",
            "--retry-attempts",
            "3",
            "--retry-on",
            "exit_code,node_lost",
            "--retry-backoff",
            "10",
            "--retry-exit-codes",
            "75,76",
        ])?;
        let Command::Runners(RunnersCommand::Create(c)) = create.command else {
            panic!("not a create");
        };
        let body = runner_body(&c);
        assert_eq!(body["max_concurrent_runs"], 5);
        assert_eq!(
            body["retry_policy"],
            serde_json::json!({"max_attempts": 3, "retry_on": ["exit_code", "node_lost"],
                               "backoff_seconds": 10, "exit_codes": [75, 76]})
        );
        let update = |args: &[&str]| -> Result<serde_json::Value, clap::Error> {
            let all: Vec<&str> = ["runners", "update", "r1"]
                .iter()
                .chain(args)
                .copied()
                .collect();
            let Command::Runners(RunnersCommand::Update(u)) = parse(&all)?.command else {
                panic!("not an update");
            };
            Ok(runner_patch(&u))
        };
        assert_eq!(
            update(&["--max-concurrent-runs", "none", "--no-retry"])?,
            serde_json::json!({"max_concurrent_runs": null, "retry_policy": null})
        );
        assert_eq!(
            update(&["--max-concurrent-runs", "2"])?["max_concurrent_runs"],
            2
        );
        assert!(update(&["--max-concurrent-runs", "many"]).is_err());
        assert_eq!(
            update(&["--isolation", "sandbox"])?,
            serde_json::json!({"isolation": "sandbox"})
        );
        assert!(update(&["--isolation", "vm"]).is_err());
        assert!(
            update(&["--retry-on", "timeout"]).is_err(),
            "needs --retry-attempts"
        );
        let Command::Run(r) = parse(&["run", "r1", "--retry-attempts", "1"])?.command else {
            panic!("not a run");
        };
        let body = run_body(&r).map_err(|_| clap::Error::new(clap::error::ErrorKind::Io))?;
        assert_eq!(
            body["retry_policy"],
            serde_json::json!({"max_attempts": 1, "retry_on": []})
        );
        Ok(())
    }

    #[test]
    fn a_schedule_becomes_its_json() -> Result<(), clap::Error> {
        let cli = parse(&[
            "schedules",
            "create",
            "r1",
            "--cron",
            "0 3 * * MON-FRI",
            "--timezone",
            "Europe/Berlin",
            "--overlap",
            "forbid",
            "--catch-up",
            "run_once",
            "--jitter",
            "30",
            "--command",
            "echo nightly",
            "-e",
            "A=1",
        ])?;
        let Command::Schedules(SchedulesCommand::Create(c)) = cli.command else {
            panic!("not a schedule create");
        };
        assert_eq!(
            crate::commands::schedule_body(&c),
            serde_json::json!({"cron": "0 3 * * MON-FRI", "timezone": "Europe/Berlin",
                "overlap": "forbid", "catch_up": "run_once", "jitter_seconds": 30,
                "run": {"command": "echo nightly",
                        "env_variables": [{"env_key": "A", "env_val": "1"}]}})
        );
        assert!(
            parse(&["schedules", "pause", "r1"]).is_err(),
            "needs the schedule id"
        );
        Ok(())
    }

    #[test]
    fn usage_errors() {
        let both: &[&str] = &[
            "runners",
            "create",
            "--name",
            "n",
            "--image",
            "b",
            "--command",
            "x",
            "--",
            "y",
        ];
        assert!(parse(both).is_err());
        assert!(parse(&["run", "r", "--env", "NOEQUALS"]).is_err());
        assert!(parse(&["runners", "create", "--name", "n", "--image", "b:"]).is_err());
        assert!(parse(&[
            "registries",
            "create",
            "--name",
            "n",
            "--host",
            "h",
            "--username",
            "u",
            "--password",
            "p"
        ])
        .is_err());
    }
}
