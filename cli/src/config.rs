//! Where `berthctl` finds the API and its token: `--url`/`--token` flags first, then the
//! `BERTH_URL`/`BERTH_TOKEN` environment variables, then a `.berth/env` file in the current
//! directory or the nearest parent that has one (the file `deploy/up.sh` writes). Each setting
//! is resolved on its own, so a token from the environment and a URL from the file combine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const URL_VAR: &str = "BERTH_URL";
pub const TOKEN_VAR: &str = "BERTH_TOKEN";

/// The settings every command needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The API's base URL, without a trailing slash.
    pub url: String,
    pub token: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Nothing said where the API is or how to authenticate.
    #[error("{}", missing_message(.missing, .env_file.as_deref()))]
    Missing {
        missing: Vec<&'static str>,
        env_file: Option<PathBuf>,
    },
    #[error("{var} is not an http(s) URL: {value}")]
    BadUrl { var: &'static str, value: String },
}

fn missing_message(missing: &[&str], env_file: Option<&Path>) -> String {
    let vars = missing.join(" and ");
    let flags: Vec<&str> = missing
        .iter()
        .map(|m| if *m == URL_VAR { "--url" } else { "--token" })
        .collect();
    let file = match env_file {
        Some(p) => format!(" ({} does not set it)", p.display()),
        None => String::new(),
    };
    format!(
        "{vars} not set: pass {}, export {vars}, or work inside a checkout whose .berth/env \
         sets it (deploy/up.sh writes that file){file}",
        flags.join(" and ")
    )
}

/// The `KEY=value` lines of an env file. Blank lines and `#` comments are skipped, an `export `
/// prefix and one pair of matching quotes around the value are removed, so a file written for
/// `. .berth/env` reads the same here.
pub fn parse_env_file(text: &str) -> HashMap<String, String> {
    let mut vars = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let unquoted = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
            .unwrap_or(value);
        vars.insert(key.trim().to_owned(), unquoted.to_owned());
    }
    vars
}

/// `.berth/env` in `start` or its nearest ancestor that has one.
pub fn find_env_file(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|dir| dir.join(".berth").join("env"))
        .find(|p| p.is_file())
}

/// An env file that was found and read.
#[derive(Debug, Clone, Default)]
pub struct EnvFile {
    pub path: Option<PathBuf>,
    pub vars: HashMap<String, String>,
}

impl EnvFile {
    /// Reads the nearest `.berth/env` above `start`; an unreadable file counts as absent.
    pub fn discover(start: &Path) -> EnvFile {
        let Some(path) = find_env_file(start) else {
            return EnvFile::default();
        };
        let vars = std::fs::read_to_string(&path)
            .map(|t| parse_env_file(&t))
            .unwrap_or_default();
        EnvFile {
            path: Some(path),
            vars,
        }
    }
}

/// Resolves each setting: flag, then environment (`env`), then the file. Empty values count as
/// unset.
pub fn resolve(
    flag_url: Option<&str>,
    flag_token: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
    file: &EnvFile,
) -> Result<Config, ConfigError> {
    let pick = |flag: Option<&str>, var: &str| {
        flag.map(str::to_owned)
            .filter(|v| !v.is_empty())
            .or_else(|| env(var).filter(|v| !v.is_empty()))
            .or_else(|| file.vars.get(var).cloned().filter(|v| !v.is_empty()))
    };
    let url = pick(flag_url, URL_VAR);
    let token = pick(flag_token, TOKEN_VAR);
    let (url, token) = match (url, token) {
        (Some(u), Some(t)) => (u, t),
        (u, t) => {
            let mut missing = vec![];
            if u.is_none() {
                missing.push(URL_VAR);
            }
            if t.is_none() {
                missing.push(TOKEN_VAR);
            }
            return Err(ConfigError::Missing {
                missing,
                env_file: file.path.clone(),
            });
        }
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ConfigError::BadUrl {
            var: URL_VAR,
            value: url,
        });
    }
    Ok(Config {
        url: url.trim_end_matches('/').to_owned(),
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> EnvFile {
        EnvFile {
            path: Some(PathBuf::from("/x/.berth/env")),
            vars: parse_env_file(text),
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn env_file_lines() {
        let v = parse_env_file(
            "# written by up.sh\nBERTH_URL=http://127.0.0.1:8080\n\n export BERTH_TOKEN=\"abc=def\"\nBERTH_REGISTRY='127.0.0.1:5000'\nnot a pair\n",
        );
        assert_eq!(
            v.get("BERTH_URL").map(String::as_str),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(v.get("BERTH_TOKEN").map(String::as_str), Some("abc=def"));
        assert_eq!(
            v.get("BERTH_REGISTRY").map(String::as_str),
            Some("127.0.0.1:5000")
        );
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn flags_beat_env_beat_file_per_setting() {
        let f = file("BERTH_URL=http://file:1\nBERTH_TOKEN=file-token\n");
        let env = |k: &str| (k == TOKEN_VAR).then(|| "env-token".to_owned());
        let c = resolve(None, None, env, &f).expect("resolves");
        assert_eq!(c.url, "http://file:1");
        assert_eq!(c.token, "env-token");
        let c = resolve(Some("https://flag:2/"), Some("flag-token"), env, &f).expect("resolves");
        assert_eq!(c.url, "https://flag:2");
        assert_eq!(c.token, "flag-token");
        let empty_env = |_: &str| Some(String::new());
        let c = resolve(None, None, empty_env, &f).expect("empty env values are unset");
        assert_eq!(c.token, "file-token");
    }

    #[test]
    fn missing_settings_are_named() {
        let err = resolve(None, None, no_env, &EnvFile::default()).expect_err("nothing set");
        let msg = err.to_string();
        assert!(msg.contains("BERTH_URL and BERTH_TOKEN not set"), "{msg}");
        assert!(msg.contains("--url and --token"), "{msg}");
        let err = resolve(None, None, no_env, &file("BERTH_URL=http://a\n")).expect_err("no token");
        let msg = err.to_string();
        assert!(msg.starts_with("BERTH_TOKEN not set"), "{msg}");
        assert!(msg.contains("/x/.berth/env does not set it"), "{msg}");
    }

    #[test]
    fn url_must_be_http() {
        let err = resolve(
            Some("localhost:8080"),
            Some("t"),
            no_env,
            &EnvFile::default(),
        );
        assert!(matches!(err, Err(ConfigError::BadUrl { .. })));
    }

    #[test]
    fn env_file_is_found_in_a_parent() -> std::io::Result<()> {
        let root = tempfile::tempdir()?;
        std::fs::create_dir_all(root.path().join(".berth"))?;
        std::fs::write(root.path().join(".berth/env"), "BERTH_URL=http://up\n")?;
        let deep = root.path().join("a/b");
        std::fs::create_dir_all(&deep)?;
        let found = EnvFile::discover(&deep);
        assert_eq!(found.path, Some(root.path().join(".berth/env")));
        assert_eq!(
            found.vars.get("BERTH_URL").map(String::as_str),
            Some("http://up")
        );
        Ok(())
    }
}
