//! How a runner's `run_command` / `argv` / `entrypoint`, and a run's overrides, become the
//! process a container starts.
//!
//! The image's own ENTRYPOINT and CMD are only known to the agent (it reads the image config),
//! so the result here is expressed the way Docker composes them: an optional entrypoint that
//! replaces the image's ENTRYPOINT (and drops its CMD), and an optional cmd that replaces the
//! image's CMD. A shell-form command becomes the cmd `["sh", "-c", command]`.

use crate::model::RunnerSpec;

/// What a run may override of its runner's command. `validate::RunInput` converts into it, so
/// this module needs nothing from the validation (which depends on [`split_words`] here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommandOverrides<'a> {
    /// Shell form.
    pub command: Option<&'a str>,
    /// Exec form; wins over `command`.
    pub argv: Option<&'a [String]>,
    pub entrypoint: Option<&'a str>,
}

/// The command a run will execute, as recorded on the run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EffectiveCommand {
    /// Shell form.
    pub command: Option<String>,
    /// Exec form (empty when the run uses the shell form or the image's default).
    pub argv: Vec<String>,
    pub entrypoint: Option<String>,
}

impl EffectiveCommand {
    /// The run's overrides on top of the runner's defaults.
    pub fn resolve<'a>(
        runner: &RunnerSpec,
        overrides: impl Into<CommandOverrides<'a>>,
    ) -> EffectiveCommand {
        let overrides = overrides.into();
        let entrypoint = overrides
            .entrypoint
            .map(str::to_owned)
            .or_else(|| runner.entrypoint.clone());
        if let Some(argv) = overrides.argv {
            return EffectiveCommand {
                command: None,
                argv: argv.to_vec(),
                entrypoint,
            };
        }
        if let Some(cmd) = overrides.command {
            return EffectiveCommand {
                command: Some(cmd.to_owned()),
                argv: vec![],
                entrypoint,
            };
        }
        EffectiveCommand {
            command: runner.run_command.clone(),
            argv: runner.argv.clone(),
            entrypoint,
        }
    }

    /// The entrypoint replacement as words, if any.
    pub fn entrypoint_words(&self) -> Option<Vec<String>> {
        self.entrypoint
            .as_deref()
            .map(|e| split_words(e).unwrap_or_else(|_| vec![e.to_owned()]))
    }

    /// The CMD replacement, if any.
    pub fn cmd(&self) -> Option<Vec<String>> {
        if let Some(c) = &self.command {
            Some(vec!["sh".to_owned(), "-c".to_owned(), c.clone()])
        } else if !self.argv.is_empty() {
            Some(self.argv.clone())
        } else {
            None
        }
    }
}

/// An entrypoint string could not be split into words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// has an unterminated quote
    #[error("has an unterminated quote")]
    UnterminatedQuote,
    /// ends with a lone backslash
    #[error("ends with a lone backslash")]
    TrailingBackslash,
}

/// Splits a string into words the way a POSIX shell does for plain words, single quotes, double
/// quotes and backslash escapes (no expansion of any kind).
pub fn split_words(s: &str) -> Result<Vec<String>, SplitError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(ch) = chars.next() {
        match ch {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(SplitError::UnterminatedQuote),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err(SplitError::UnterminatedQuote),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(SplitError::UnterminatedQuote),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => return Err(SplitError::TrailingBackslash),
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner() -> RunnerSpec {
        RunnerSpec {
            name: "n".into(),
            image_name: "busybox".into(),
            image_tag: "latest".into(),
            run_command: Some("echo default".into()),
            argv: vec![],
            entrypoint: None,
            timeout_seconds: 60,
            region: "fra".into(),
            instance_type: "standard-s".into(),
            env_variables: vec![],
            container_registry_id: None,
            stop_grace_seconds: None,
            max_concurrent_runs: None,
            retry_policy: None,
            notify: None,
            isolation: Default::default(),
        }
    }

    #[test]
    fn splits_like_a_shell() {
        assert_eq!(
            split_words(r#"/bin/tini -- "a b" 'c d' e\ f"#),
            Ok(vec!["/bin/tini", "--", "a b", "c d", "e f"]
                .into_iter()
                .map(String::from)
                .collect())
        );
        assert_eq!(split_words("  "), Ok(vec![]));
        assert_eq!(split_words("'x"), Err(SplitError::UnterminatedQuote));
        assert_eq!(split_words("x\\"), Err(SplitError::TrailingBackslash));
    }

    #[test]
    fn runner_default_is_shell_form() {
        let c = EffectiveCommand::resolve(&runner(), CommandOverrides::default());
        assert_eq!(
            c.cmd(),
            Some(vec!["sh".into(), "-c".into(), "echo default".into()])
        );
    }

    #[test]
    fn run_argv_overrides_runner_command() {
        let argv = vec!["echo".to_owned(), "x".to_owned()];
        let o = CommandOverrides {
            argv: Some(&argv),
            ..Default::default()
        };
        let c = EffectiveCommand::resolve(&runner(), o);
        assert_eq!(c.command, None);
        assert_eq!(c.cmd(), Some(vec!["echo".into(), "x".into()]));
    }

    #[test]
    fn run_command_and_entrypoint_override() {
        let o = CommandOverrides {
            command: Some("exit 3"),
            entrypoint: Some("/bin/env FOO=1"),
            ..Default::default()
        };
        let c = EffectiveCommand::resolve(&runner(), o);
        assert_eq!(c.command.as_deref(), Some("exit 3"));
        assert_eq!(
            c.entrypoint_words(),
            Some(vec!["/bin/env".into(), "FOO=1".into()])
        );
    }

    #[test]
    fn no_command_anywhere_uses_the_image_default() {
        let mut r = runner();
        r.run_command = None;
        let c = EffectiveCommand::resolve(&r, CommandOverrides::default());
        assert_eq!(c.cmd(), None);
        assert_eq!(c.entrypoint_words(), None);
    }
}
