//! A run's overrides: [`RunInput`] (a batch of them: [`crate::overrides::check_batch`]).

use super::fields::{check_argv, check_command, check_entrypoint, check_env, check_stop_grace};
use super::files::{check_files, FileInput};
use super::limits::*;
use super::{Collector, ValidationErrors};
use crate::command::CommandOverrides;
use crate::model::{EnvVar, RunFile};
use serde::{Deserialize, Serialize};

/// `POST /v1/runners/{id}/runs` body: per-run overrides (also stored with a schedule: its
/// fires' overrides).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunInput {
    /// Exec form (no shell): 1 to 200 elements, at most 8,000 characters in total. Mutually
    /// exclusive with `command`.
    #[schema(min_items = 1, max_items = 200)]
    pub argv: Option<Vec<String>>,
    /// Shell form, run as `sh -c`: 1 to 4,000 characters, not blank. Mutually exclusive with
    /// `argv`.
    #[schema(min_length = 1, max_length = 4000)]
    pub command: Option<String>,
    /// At most 500 characters.
    #[schema(max_length = 500)]
    pub entrypoint: Option<String>,
    /// Added to (and overriding) the runner's variables; at most 200.
    #[schema(max_items = 200)]
    pub env_variables: Option<Vec<EnvVar>>,
    /// Small files placed read-only in the container (see [`FileInput`]): at most 64, 1 MiB
    /// decoded in total.
    #[schema(max_items = 64)]
    pub files: Option<Vec<FileInput>>,
    /// Overrides the runner's `stop_grace_seconds` (1 to 300).
    #[schema(minimum = 1, maximum = 300)]
    pub stop_grace_seconds: Option<i64>,
    /// Replaces the runner's retry policy for this run (`{"max_attempts": 1}`: never retry).
    pub retry_policy: Option<crate::retry::RetryPolicy>,
    /// `true`: the run is for an ephemeral node the caller starts (`berthctl run --here`, e.g.
    /// inside a CI job). It is never placed on the fleet: it waits, pending, for the node that
    /// registers with its `ephemeral_claim` (in this call's answer only), which takes this run
    /// and no other. A run whose node has not connected in time ends `failed` with
    /// `node_lost`. Not retried. Single runs only (not in a batch or a schedule).
    pub ephemeral: Option<bool>,
}

impl RunInput {
    /// The uploaded files, checked and decoded. Fails exactly when [`RunInput::validate`]
    /// reports a `files…` error.
    pub fn decoded_files(&self) -> Result<Vec<RunFile>, ValidationErrors> {
        let mut c = Collector::default();
        let files = check_files(&mut c, self.files.as_deref().unwrap_or_default());
        c.finish(files).map(|files| {
            files
                .into_iter()
                .map(|(path, mode, content)| RunFile::new(path, mode, content))
                .collect()
        })
    }

    pub fn validate(self) -> Result<RunInput, ValidationErrors> {
        let mut c = Collector::default();
        if self.argv.is_some() && self.command.is_some() {
            c.push("argv", "argv and command are mutually exclusive");
        }
        if let Some(cmd) = &self.command {
            check_command(&mut c, "command", cmd, RUN_OVERRIDE_COMMAND_MAX);
        }
        if let Some(argv) = &self.argv {
            if argv.is_empty() {
                c.push("argv", "must not be empty");
            }
            check_argv(&mut c, argv);
        }
        if let Some(ep) = &self.entrypoint {
            check_entrypoint(&mut c, ep);
        }
        if let Some(env) = &self.env_variables {
            check_env(&mut c, env);
        }
        if let Some(files) = &self.files {
            check_files(&mut c, files);
        }
        if let Some(policy) = &self.retry_policy {
            policy.check(&mut c, "retry_policy");
        }
        check_stop_grace(&mut c, self.stop_grace_seconds);
        c.finish(self)
    }
}

/// The command part of a run's overrides, for [`crate::command::EffectiveCommand::resolve`].
impl<'a> From<&'a RunInput> for CommandOverrides<'a> {
    fn from(input: &'a RunInput) -> Self {
        CommandOverrides {
            command: input.command.as_deref(),
            argv: input.argv.as_deref(),
            entrypoint: input.entrypoint.as_deref(),
        }
    }
}
