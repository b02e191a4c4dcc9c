//! Pure validation of what users send. Every check names the field it is about, so the API can
//! answer `{"errors": [{"field": "name", "message": "…"}]}`.
//!
//! Inputs arrive as `*Input` structs whose fields are all optional (so a missing field is a
//! validation error naming it, not a parse error), and leave as checked model values.
//!
//! # Layout
//! - this file: the error types ([`FieldError`], [`ValidationErrors`]) and the collector every
//!   check reports into;
//! - [`limits`]: every documented limit, one constant each (the OpenAPI document states them);
//! - `runner`: [`RunnerInput`] (create and patch) and [`validate_spec`];
//! - `run`: [`RunInput`] (a run's overrides; batches: [`crate::overrides::check_batch`]);
//! - `files`: [`FileInput`], the files a run uploads, and [`file_path_problem`];
//! - `registry`: [`RegistryInput`] → [`RegistrySpec`];
//! - `fields`: checks shared by runners and runs (command, argv, entrypoint, env, stop grace);
//! - `names`: the syntax of image names, tags, hosts and env keys.
//!
//! Dependencies point one way: `validate` uses [`crate::command`] (to split an entrypoint into
//! words) and `run` maps a [`RunInput`] onto [`crate::command::CommandOverrides`]; `command`
//! knows nothing of the validation.

mod fields;
mod files;
pub mod limits;
mod names;
mod registry;
mod run;
mod runner;

pub use files::{claim_path, file_path_problem, FileInput};
pub use limits::*;
pub use names::{is_env_key, is_host, is_image_name, is_image_tag};
pub use registry::{RegistryInput, RegistrySpec};
pub use run::RunInput;
pub use runner::{validate_spec, RunnerInput};

use serde::Serialize;

/// One wrong field: `field` is its JSON path (`env_variables[1].env_key`), a header or query
/// parameter name, or `""` when the error concerns no single field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// One or more fields were wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid input: {}", .0.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; "))]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    pub fn single(field: &str, message: impl Into<String>) -> Self {
        ValidationErrors(vec![FieldError {
            field: field.to_owned(),
            message: message.into(),
        }])
    }
}

#[derive(Default)]
pub(crate) struct Collector(Vec<FieldError>);

impl Collector {
    pub(crate) fn push(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.to_owned(),
            message: message.into(),
        });
    }

    pub(crate) fn finish<T>(self, value: T) -> Result<T, ValidationErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ValidationErrors(self.0))
        }
    }
}

#[cfg(test)]
mod tests;
