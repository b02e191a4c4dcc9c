//! What every Berth binary does at start: private files and the shutdown signal (logging and
//! tracing: [`crate::telemetry`]).

use std::future::Future;

/// Makes every file and directory this process creates from now on private to its own user
/// (umask 077: files 0600, directories 0700 unless a mode is set explicitly), as a systemd unit's
/// `UMask=0077` would: the store, journals, run output and credentials hold secrets. Call first
/// thing in `main` (the umask is shared by all of the process's threads and its children).
pub fn private_files() {
    use nix::sys::stat::{umask, Mode};
    umask(Mode::S_IRWXG | Mode::S_IRWXO);
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed now, not on first poll, so a
/// signal that arrives during start-up is not fatal.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// A secret setting that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretSettingError {
    #[error("{env} and {flag} are both set; give the secret one way")]
    Both { env: String, flag: String },
    #[error("{flag} {path}: {source}")]
    Unreadable {
        flag: String,
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is empty")]
    Empty(String),
}

/// A secret (a token, a key) from the environment variable `env` or from the file a `--…-file`
/// flag names (`flag`, for messages), never from a command line (`/proc/PID/cmdline` is
/// readable by every local user; a process's environment and a 0600 file are not). Surrounding
/// whitespace (a file's final newline) is not part of it. `None` when neither is set.
pub fn secret_setting(
    env: &str,
    flag: &str,
    file: Option<&std::path::Path>,
) -> Result<Option<String>, SecretSettingError> {
    let inline = std::env::var(env).ok().filter(|v| !v.is_empty());
    let value = match (inline, file) {
        (Some(_), Some(_)) => {
            return Err(SecretSettingError::Both {
                env: env.to_owned(),
                flag: flag.to_owned(),
            })
        }
        (Some(v), None) => v,
        (None, Some(path)) => {
            std::fs::read_to_string(path).map_err(|source| SecretSettingError::Unreadable {
                flag: flag.to_owned(),
                path: path.display().to_string(),
                source,
            })?
        }
        (None, None) => return Ok(None),
    };
    let value = value.trim();
    if value.is_empty() {
        return Err(SecretSettingError::Empty(match file {
            Some(p) => format!("{flag} {}", p.display()),
            None => env.to_owned(),
        }));
    }
    Ok(Some(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_comes_from_a_file_without_its_newline_and_never_two_ways() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret-token-0123\n")?;
        let env = "BERTH_TEST_SECRET_SETTING_UNSET";
        assert_eq!(
            secret_setting(env, "--token-file", Some(&path))
                .ok()
                .flatten(),
            Some("s3cret-token-0123".to_owned())
        );
        assert!(matches!(
            secret_setting(env, "--token-file", None),
            Ok(None)
        ));
        std::fs::write(&path, "\n")?;
        let empty = secret_setting(env, "--token-file", Some(&path));
        assert!(matches!(empty, Err(SecretSettingError::Empty(_))));
        let missing = secret_setting(env, "--token-file", Some(&dir.path().join("absent")));
        assert!(
            matches!(&missing, Err(e) if e.to_string().contains("absent")),
            "{missing:?}"
        );
        // Only this test sets it, and only in this process.
        std::env::set_var("BERTH_TEST_SECRET_SETTING_SET", "from-env");
        let both = secret_setting("BERTH_TEST_SECRET_SETTING_SET", "--token-file", Some(&path));
        assert!(matches!(both, Err(SecretSettingError::Both { .. })));
        assert_eq!(
            secret_setting("BERTH_TEST_SECRET_SETTING_SET", "--token-file", None)
                .ok()
                .flatten(),
            Some("from-env".to_owned())
        );
        Ok(())
    }
}
