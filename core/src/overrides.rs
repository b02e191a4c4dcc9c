//! What one run changes from its runner: [`RunOverrides`], the one form the scheduler creates a
//! run from, whether it came alone (`CreateRun`) or as a batch item (`CreateRuns`).
//!
//! It is made in two ways, each decoding its input once: [`RunOverrides::from_input`] from the
//! API's JSON body (checked, and the files' base64 decoded there, at the API, and never again),
//! and [`crate::convert::overrides_from_pb`] from the gRPC message, whose files already travel
//! as bytes. The scheduler checks what arrives again with [`RunOverrides::validate`]: the same
//! rules, the files' on their bytes ([`crate::files::check_decoded_files`]).

use crate::files::check_decoded_files;
use crate::model::RunFile;
use crate::validate::{FieldError, RunInput, ValidationErrors};

/// A run's overrides: argv or command, entrypoint, env and stop grace in `input` (its JSON
/// form, whose `files` is always None here), and the uploaded files, decoded.
#[derive(Debug, Clone, Default)]
pub struct RunOverrides {
    input: RunInput,
    files: Vec<RunFile>,
}

impl RunOverrides {
    /// The API's JSON body, checked (every error names its field) and its files decoded.
    pub fn from_input(input: RunInput) -> Result<RunOverrides, ValidationErrors> {
        let mut input = input.validate()?;
        let files = input.decoded_files()?;
        input.files = None;
        Ok(RunOverrides { input, files })
    }

    /// `input` (its `files` None) with `files` decoded elsewhere, not yet checked.
    pub(crate) fn decoded(input: RunInput, files: Vec<RunFile>) -> RunOverrides {
        debug_assert!(input.files.is_none(), "decoded files travel apart");
        RunOverrides { input, files }
    }

    /// Checks everything with the API's rules, the files on their bytes; every error names its
    /// field as the API's do (the input's errors first, then the files').
    pub fn validate(self) -> Result<RunOverrides, ValidationErrors> {
        let RunOverrides { input, files } = self;
        let file_errors = check_decoded_files(&files);
        match input.validate() {
            Ok(input) if file_errors.is_empty() => Ok(RunOverrides { input, files }),
            Ok(_) => Err(ValidationErrors(file_errors)),
            Err(ValidationErrors(mut errors)) => {
                errors.extend(file_errors);
                Err(ValidationErrors(errors))
            }
        }
    }

    /// argv or command, entrypoint, env and stop grace (never files: see [`Self::files`]).
    pub fn input(&self) -> &RunInput {
        &self.input
    }

    pub fn files(&self) -> &[RunFile] {
        &self.files
    }

    pub fn into_parts(self) -> (RunInput, Vec<RunFile>) {
        (self.input, self.files)
    }
}

/// Checks every item of a batch with `check`, naming the errors of item `i` `runs[i].field`;
/// all items' errors are reported together.
pub fn check_batch<T>(
    items: impl IntoIterator<Item = T>,
    check: impl Fn(T) -> Result<RunOverrides, ValidationErrors>,
) -> Result<Vec<RunOverrides>, ValidationErrors> {
    let mut errors = Vec::new();
    let mut checked = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        match check(item) {
            Ok(item) if item.input.ephemeral == Some(true) => errors.push(FieldError {
                field: format!("runs[{i}].ephemeral"),
                message: "a batch's runs are placed on the fleet; create an ephemeral run on its own (berthctl run --here)".to_owned(),
            }),
            Ok(item) => checked.push(item),
            Err(e) => errors.extend(e.0.into_iter().map(|f| FieldError {
                field: format!("runs[{i}].{}", f.field),
                message: f.message,
            })),
        }
    }
    if errors.is_empty() {
        Ok(checked)
    } else {
        Err(ValidationErrors(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::FileInput;

    fn fields(r: Result<RunOverrides, ValidationErrors>) -> Vec<String> {
        r.err()
            .map(|e| e.0.into_iter().map(|f| f.field).collect())
            .unwrap_or_default()
    }

    #[test]
    fn the_json_form_is_checked_and_its_files_decoded_once() {
        let input = RunInput {
            command: Some("echo hi".into()),
            files: Some(vec![FileInput {
                path: Some("/etc/x".into()),
                content_base64: Some("aGVsbG8=".into()),
                mode: None,
            }]),
            ..Default::default()
        };
        let o = RunOverrides::from_input(input).expect("valid");
        assert!(o.input().files.is_none(), "the files travel decoded, apart");
        assert_eq!(o.input().command.as_deref(), Some("echo hi"));
        assert_eq!(o.files().len(), 1);
        assert_eq!(&*o.files()[0].content, b"hello");
        assert_eq!(o.files()[0].mode, crate::validate::FILE_MODE_DEFAULT);

        let bad = RunInput {
            argv: Some(vec![]),
            files: Some(vec![FileInput {
                path: Some("/proc/x".into()),
                content_base64: Some("!".into()),
                mode: None,
            }]),
            ..Default::default()
        };
        assert_eq!(
            fields(RunOverrides::from_input(bad)),
            ["argv", "files[0].path", "files[0].content_base64"]
        );
    }

    #[test]
    fn decoded_files_are_checked_with_the_rest() {
        let files = vec![RunFile::new("/sys/x".into(), 0o444, vec![])];
        let input = RunInput {
            stop_grace_seconds: Some(0),
            ..Default::default()
        };
        assert_eq!(
            fields(RunOverrides::decoded(input, files.clone()).validate()),
            ["stop_grace_seconds", "files[0].path"]
        );
        assert_eq!(
            fields(RunOverrides::decoded(RunInput::default(), files).validate()),
            ["files[0].path"]
        );
        assert!(RunOverrides::default().validate().is_ok());
    }

    #[test]
    fn batch_errors_name_the_item() {
        let items = vec![
            RunInput::default(),
            RunInput {
                command: Some(" ".into()),
                ..Default::default()
            },
            RunInput {
                stop_grace_seconds: Some(301),
                ..Default::default()
            },
        ];
        let errors =
            fields(check_batch(items, RunOverrides::from_input).map(|_| RunOverrides::default()));
        assert_eq!(errors, ["runs[1].command", "runs[2].stop_grace_seconds"]);
        let ok = check_batch(vec![RunInput::default(); 3], RunOverrides::from_input);
        assert_eq!(ok.map(|v| v.len()).ok(), Some(3));
    }
}
