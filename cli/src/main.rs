//! # Layout
//! `berthctl`, the command-line client of Berth's REST API.
//! - [`args`]: the command line (clap) and the parsers for `IMAGE[:TAG]` and `KEY=value`;
//! - [`config`]: the API's URL and token from flags, environment, or `.berth/env`;
//! - [`client`]: HTTP with bearer auth and the API's error body decoded;
//! - [`commands`]: one function per command; [`commands::follow`] follows a run live (its SSE
//!   stream parsed by `eventsource-stream`, reconnects spaced by `backon` with jitter);
//! - [`output`]: tables and `key: value` blocks.
//!
//! Exit codes: 0 success, 1 an API, network or input error, 2 a usage error, and for a
//! followed run its own exit code (130 when canceled or interrupted).

mod args;
mod client;
mod commands;
mod config;
mod output;

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = args::Cli::parse();
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            commands::err_line(&format!("error: {e:#}"));
            ExitCode::from(1)
        }
    }
}

async fn run(cli: args::Cli) -> anyhow::Result<u8> {
    // Offline: making certificates needs no API to talk to.
    if let args::Command::Admin(args::AdminCommand::Tls(c)) = cli.command {
        return Ok(commands::admin::tls(c)?);
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    let config = config::resolve(
        cli.url.as_deref(),
        cli.token.as_deref(),
        |k| std::env::var(k).ok(),
        &config::EnvFile::discover(&cwd),
    )?;
    let ctx = commands::Ctx {
        client: client::Client::new(&config)?,
        json: cli.json,
    };
    Ok(commands::execute(&ctx, cli.command).await?)
}
