//! Checks of the fields runners and runs share; each reports into the caller's collector.

use super::limits::*;
use super::names::is_env_key;
use super::Collector;
use crate::command::split_words;
use crate::model::EnvVar;

pub(super) fn check_stop_grace(c: &mut Collector, v: Option<i64>) -> Option<u32> {
    let v = v?;
    match u32::try_from(v) {
        Ok(g) if (STOP_GRACE_MIN..=STOP_GRACE_MAX).contains(&v) => Some(g),
        _ => {
            c.push(
                "stop_grace_seconds",
                format!("must be between {STOP_GRACE_MIN} and {STOP_GRACE_MAX}"),
            );
            None
        }
    }
}

pub(super) fn check_max_concurrent_runs(c: &mut Collector, v: Option<i64>) -> Option<u32> {
    let v = v?;
    match u32::try_from(v) {
        Ok(n) if (MAX_CONCURRENT_RUNS_MIN..=MAX_CONCURRENT_RUNS_MAX).contains(&v) => Some(n),
        _ => {
            c.push(
                "max_concurrent_runs",
                format!(
                    "must be between {MAX_CONCURRENT_RUNS_MIN} and {MAX_CONCURRENT_RUNS_MAX}, or null for no cap"
                ),
            );
            None
        }
    }
}

pub(super) fn check_command(c: &mut Collector, field: &str, cmd: &str, max: usize) {
    let len = cmd.chars().count();
    if cmd.trim().is_empty() {
        c.push(field, "must not be empty");
    } else if len > max {
        c.push(field, format!("must be at most {max} characters"));
    }
}

pub(super) fn check_argv(c: &mut Collector, argv: &[String]) {
    if argv.len() > ARGV_MAX_ELEMENTS {
        c.push(
            "argv",
            format!("must have at most {ARGV_MAX_ELEMENTS} elements"),
        );
    }
    let total: usize = argv.iter().map(|a| a.chars().count()).sum();
    if total > ARGV_MAX_TOTAL_CHARS {
        c.push(
            "argv",
            format!("must have at most {ARGV_MAX_TOTAL_CHARS} characters in total"),
        );
    }
    if argv.iter().any(|a| a.contains('\0')) {
        c.push("argv", "must not contain NUL characters");
    }
}

pub(super) fn check_entrypoint(c: &mut Collector, ep: &str) {
    if ep.chars().count() > ENTRYPOINT_MAX {
        c.push(
            "entrypoint",
            format!("must be at most {ENTRYPOINT_MAX} characters"),
        );
    } else if let Err(e) = split_words(ep) {
        c.push("entrypoint", e.to_string());
    }
}

pub(super) fn check_env(c: &mut Collector, env: &[EnvVar]) {
    if env.len() > ENV_MAX_VARIABLES {
        c.push(
            "env_variables",
            format!("must have at most {ENV_MAX_VARIABLES} variables"),
        );
    }
    for (i, v) in env.iter().enumerate() {
        if !is_env_key(&v.env_key) {
            c.push(
                &format!("env_variables[{i}].env_key"),
                "must match [A-Za-z_][A-Za-z0-9_]*",
            );
        }
        if v.env_val.len() > ENV_VALUE_MAX || v.env_val.contains('\0') {
            c.push(
                &format!("env_variables[{i}].env_val"),
                format!("must be at most {ENV_VALUE_MAX} bytes without NUL characters"),
            );
        }
    }
}
