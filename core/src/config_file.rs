//! Daemon settings from `/etc/berth/<daemon>.toml`, under the command line and the environment.
//!
//! Every daemon setting is a clap argument (its flag, its environment variable, its built-in
//! default); the config file adds one more source between the environment and the default:
//!
//! ```text
//! --flag on the command line  >  BERTH_… environment variable  >  <daemon>.toml  >  default
//! ```
//!
//! A key of the file is the argument's id: the flag's long name with `_` for `-` (`max_runs = 8`
//! for `--max-runs 8`; the dashed spelling is accepted too), or the field's name where the flag
//! is named otherwise (`insecure_registries` for the repeatable `--insecure-registry`). Lists are TOML arrays, switches TOML
//! booleans. The file is `--config FILE`, else `BERTH_<DAEMON>_CONFIG`, else
//! `/etc/berth/<daemon>.toml` when it exists. Anything wrong in it — an unknown key, a value of
//! the wrong type or out of range, a TOML syntax error — stops the daemon before it does
//! anything, with a message naming the file, the key and the reason. Secrets are never settings
//! of their own: a file holds them and a `*_file` key names the file.
//!
//! [`reference`] renders the settings of a command as the Markdown table of
//! `docs/CONFIG.md`, so the reference page is generated from the same definitions.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command, CommandFactory, FromArgMatches};

/// The exit code of a daemon whose configuration is wrong (`EX_CONFIG` of sysexits.h); its
/// systemd unit does not restart it for this code (`RestartPreventExitStatus=78`).
pub const EXIT_CONFIG: i32 = 78;

/// The argument id of `--config` (added to every daemon's command).
const CONFIG_ID: &str = "config";

/// Where a daemon's config file is when nothing names one.
pub fn default_path(daemon: &str) -> PathBuf {
    PathBuf::from(format!("/etc/berth/{daemon}.toml"))
}

/// The environment variable naming a daemon's config file (`BERTH_NODE_AGENT_CONFIG`).
pub fn env_var(daemon: &str) -> String {
    format!(
        "BERTH_{}_CONFIG",
        daemon.to_ascii_uppercase().replace('-', "_")
    )
}

/// What is wrong with a config file (or with the command line read over it).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: unknown key `{key}`{hint}")]
    UnknownKey {
        path: PathBuf,
        key: String,
        /// ` (did you mean `max_runs`?)`, or empty.
        hint: String,
    },
    #[error("{path}: key `{key}`: {reason}")]
    BadValue {
        path: PathBuf,
        key: String,
        reason: String,
    },
    /// The command line itself is wrong (or asked for help): clap prints and exits.
    #[error(transparent)]
    Cli(#[from] clap::Error),
}

impl ConfigError {
    /// Prints the error the way the daemon's users expect and exits: clap's own output and code
    /// for the command line (`--help` included), `berth-scheduler: …` and [`EXIT_CONFIG`] for
    /// the file.
    pub fn exit(self, program: &str) -> ! {
        match self {
            ConfigError::Cli(e) => e.exit(),
            other => {
                // Before logging exists: stderr is where a unit's journal and a terminal see it.
                eprintln!("{program}: {other}");
                std::process::exit(EXIT_CONFIG)
            }
        }
    }
}

/// Parses the process's command line over `daemon`'s config file; on any error prints it and
/// exits (see [`ConfigError::exit`]).
pub fn parse<P: CommandFactory + FromArgMatches>(daemon: &str) -> P {
    let program = P::command().get_name().to_owned();
    match try_parse_from(daemon, std::env::args_os(), |name| std::env::var_os(name)) {
        Ok(parsed) => parsed,
        Err(error) => error.exit(&program),
    }
}

/// [`parse`] over a given command line, returning errors instead of exiting. `env` looks up the
/// variable that names the config file; clap reads the settings' own variables from the
/// process's environment.
pub fn try_parse_from<P, I, T>(
    daemon: &str,
    argv: I,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<P, ConfigError>
where
    P: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let mut cmd = with_config_arg(P::command(), daemon);
    let (path, explicit) = match config_on_command_line(&argv) {
        Some(path) => (path, true),
        None => match env(&env_var(daemon)).filter(|v| !v.is_empty()) {
            Some(path) => (PathBuf::from(path), true),
            None => (default_path(daemon), false),
        },
    };
    let settings = match std::fs::read_to_string(&path) {
        Ok(text) => settings(&cmd, &path, &text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Vec::new(),
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    for setting in &settings {
        let values = setting.values.clone();
        cmd = cmd.mut_arg(&setting.id, |arg| {
            arg.default_values(values).required(false)
        });
    }
    let matches = cmd
        .try_get_matches_from(&argv)
        .map_err(|e| attribute(&e, &settings, &path).unwrap_or(ConfigError::Cli(e)))?;
    P::from_arg_matches(&matches)
        .map_err(|e| attribute(&e, &settings, &path).unwrap_or(ConfigError::Cli(e)))
}

/// `cmd` with `--config FILE` (its value is read before clap parses; see [`try_parse_from`]).
fn with_config_arg(cmd: Command, daemon: &str) -> Command {
    cmd.arg(
        Arg::new(CONFIG_ID)
            .long(CONFIG_ID)
            .value_name("FILE")
            .env(env_var(daemon))
            .value_parser(clap::value_parser!(PathBuf))
            .help(format!(
                "Settings file (TOML; flags and environment variables override it) [default: {}, when it exists]",
                default_path(daemon).display()
            )),
    )
}

/// The value of `--config FILE` or `--config=FILE`, if the command line has one (before `--`).
fn config_on_command_line(argv: &[OsString]) -> Option<PathBuf> {
    let mut args = argv.iter().skip(1);
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy();
        if arg == "--" {
            return None;
        }
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(value) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(value));
        }
    }
    None
}

/// One key of the file, checked against the command: the argument it sets and its values.
#[derive(Debug, Clone)]
struct Setting {
    key: String,
    id: String,
    values: Vec<String>,
}

/// The file's keys as settings of `cmd`, or what is wrong with the first bad one.
fn settings(cmd: &Command, path: &Path, text: &str) -> Result<Vec<Setting>, ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
    let known = file_args(cmd);
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::new();
    for (key, value) in &table {
        let id = key.replace('-', "_");
        let Some(arg) = known.get(&id) else {
            return Err(ConfigError::UnknownKey {
                path: path.to_owned(),
                key: key.clone(),
                hint: suggestion(&id, known.keys()),
            });
        };
        if let Some(first) = seen.insert(id.clone(), key.clone()) {
            return Err(ConfigError::BadValue {
                path: path.to_owned(),
                key: key.clone(),
                reason: format!("set twice (also as `{first}`)"),
            });
        }
        let bad = |reason: String| ConfigError::BadValue {
            path: path.to_owned(),
            key: key.clone(),
            reason,
        };
        let values = values_of(arg, value).map_err(bad)?;
        out.push(Setting {
            key: key.clone(),
            id,
            values,
        });
    }
    Ok(out)
}

/// The arguments a config file may set, by id: every long option but `--config`, `--help` and
/// `--version`.
fn file_args(cmd: &Command) -> BTreeMap<String, Arg> {
    cmd.get_arguments()
        .filter(|a| a.get_long().is_some() && !a.is_positional())
        .filter(|a| {
            !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
        })
        .filter(|a| a.get_id().as_str() != CONFIG_ID)
        .map(|a| (a.get_id().as_str().to_owned(), a.clone()))
        .collect()
}

/// Whether `arg` takes several values (repeated, or split at a delimiter).
fn takes_many(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Append) || arg.get_value_delimiter().is_some()
}

/// The TOML `value` as the strings clap parses for `arg` (its own value parser then checks them).
fn values_of(arg: &Arg, value: &toml::Value) -> Result<Vec<String>, String> {
    if !arg.get_action().takes_values() {
        return match value {
            toml::Value::Boolean(b) => Ok(vec![b.to_string()]),
            other => Err(format!(
                "expects true or false, not {} {other}",
                other.type_str()
            )),
        };
    }
    let scalar = |v: &toml::Value| -> Result<String, String> {
        match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            toml::Value::Boolean(b) => Ok(b.to_string()),
            other => Err(format!(
                "expects a string or a number, not {} {other}",
                other.type_str()
            )),
        }
    };
    match value {
        toml::Value::Array(items) if takes_many(arg) => items.iter().map(scalar).collect(),
        toml::Value::Array(_) => Err("expects one value, not a list".to_owned()),
        other => scalar(other).map(|v| vec![v]),
    }
}

/// ` (did you mean `x`?)` for the known key closest to `key`, when one is close.
fn suggestion<'a>(key: &str, known: impl Iterator<Item = &'a String>) -> String {
    let best = known
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min();
    match best {
        Some((_, k)) => format!(" (did you mean `{k}`?)"),
        None => " (see docs/CONFIG.md for the settings)".to_owned(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(here + 1);
            prev = here;
        }
    }
    row[b.len()]
}

/// The file's key behind clap's complaint about a value, when the value came from the file.
fn attribute(e: &clap::Error, settings: &[Setting], path: &Path) -> Option<ConfigError> {
    use clap::error::{ContextKind, ContextValue};
    let arg = match e.get(ContextKind::InvalidArg)? {
        ContextValue::String(s) => s.clone(),
        _ => return None,
    };
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let setting = settings.iter().find(|s| {
        let long = s.id.replace('_', "-");
        (arg == format!("--{long}") || arg.starts_with(&format!("--{long} ")))
            && value.as_ref().is_none_or(|v| s.values.contains(v))
    })?;
    let rendered = e.render().to_string();
    let reason = rendered
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned();
    Some(ConfigError::BadValue {
        path: path.to_owned(),
        key: setting.key.clone(),
        reason,
    })
}

/// The settings of `cmd` as a Markdown table: key, flag, environment variable, default,
/// description (the flag's help). `daemon` names the file in the heading line.
pub fn reference(cmd: &Command, daemon: &str) -> String {
    let cmd = with_config_arg(cmd.clone(), daemon);
    let mut out = String::new();
    out.push_str("| key | flag | environment | default | what it sets |\n");
    out.push_str("|---|---|---|---|---|\n");
    let mut args: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| a.get_long().is_some() && !a.is_positional() && !a.is_hide_set())
        .filter(|a| {
            !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
        })
        .collect();
    // `--config` first: it is the one setting the file cannot hold.
    args.sort_by_key(|a| a.get_id().as_str() != CONFIG_ID);
    for arg in args {
        let id = arg.get_id().as_str();
        let long = arg.get_long().unwrap_or(id);
        let key = if id == CONFIG_ID {
            "—".to_owned()
        } else {
            format!("`{id}`")
        };
        let flag = if arg.get_action().takes_values() {
            let name = arg
                .get_value_names()
                .and_then(|n| n.first())
                .map_or_else(|| id.to_ascii_uppercase(), |n| n.to_string());
            format!("`--{long} {name}`")
        } else {
            format!("`--{long}`")
        };
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_else(|| "—".to_owned());
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if id == CONFIG_ID {
            format!("`{}` if present", default_path(daemon).display())
        } else if !arg.get_action().takes_values() {
            "`false`".to_owned()
        } else if defaults.is_empty() {
            if arg.is_required_set() {
                "required".to_owned()
            } else {
                "unset".to_owned()
            }
        } else {
            format!("`{}`", defaults.join(","))
        };
        let help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let help = help
            .replace(" [default: /etc/berth/", "\u{0} ")
            .split('\u{0}')
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replace('|', "\\|");
        out.push_str(&format!(
            "| {key} | {flag} | {env} | {default} | {help} |\n"
        ));
    }
    out
}

/// Replaces the text between `<!-- begin NAME -->` and `<!-- end NAME -->` in `page` with
/// `section`; None when the markers are missing. For keeping a generated reference page current.
pub fn replace_section(page: &str, name: &str, section: &str) -> Option<String> {
    let begin = format!("<!-- begin {name} -->\n");
    let end = format!("<!-- end {name} -->");
    let start = page.find(&begin)? + begin.len();
    let stop = start + page[start..].find(&end)?;
    Some(format!("{}{section}{}", &page[..start], &page[stop..]))
}

/// Whether the section `daemon` of the reference page `page` (a path) is what `cmd` renders; with
/// `BERTH_BLESS` set in the environment, rewrites it instead. For each daemon's unit test.
pub fn check_reference(cmd: &Command, daemon: &str, page: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(page).map_err(|e| format!("{}: {e}", page.display()))?;
    let updated = replace_section(&text, daemon, &reference(cmd, daemon))
        .ok_or_else(|| format!("{} has no `{daemon}` markers", page.display()))?;
    if std::env::var_os("BERTH_BLESS").is_some() {
        return std::fs::write(page, updated).map_err(|e| format!("{}: {e}", page.display()));
    }
    if updated != text {
        return Err(format!(
            "{} is out of date for {daemon}: run the test with BERTH_BLESS=1",
            page.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A daemon's command line, as the real ones are written.
    #[derive(Debug, Parser, PartialEq)]
    #[command(name = "berth-test")]
    struct Cli {
        /// Node ID.
        #[arg(long, env = "BERTH_T_NODE_ID")]
        node_id: String,
        /// Most runs at once.
        #[arg(long, env = "BERTH_T_MAX_RUNS", default_value_t = 8,
              value_parser = clap::value_parser!(u32).range(1..=1000))]
        max_runs: u32,
        /// Registries over plain HTTP.
        #[arg(
            long = "insecure-registry",
            env = "BERTH_T_INSECURE",
            value_delimiter = ','
        )]
        insecure_registries: Vec<String>,
        /// A switch.
        #[arg(long, env = "BERTH_T_ALLOW")]
        allow_private: bool,
        /// A path.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// A fraction.
        #[arg(long, default_value_t = 1.5)]
        grace: f64,
    }

    fn parse_with(file: &str, argv: &[&str], env: &[(&str, &str)]) -> Result<Cli, ConfigError> {
        let dir = tempfile::tempdir().map_err(|source| ConfigError::Read {
            path: PathBuf::from("tempdir"),
            source,
        })?;
        let path = dir.path().join("t.toml");
        std::fs::write(&path, file).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let mut full: Vec<String> = vec!["berth-test".into(), "--config".into()];
        full.push(path.display().to_string());
        full.extend(argv.iter().map(|s| (*s).to_owned()));
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        try_parse_from::<Cli, _, _>("test", full, |k| env.get(k).map(OsString::from))
    }

    fn message(r: Result<Cli, ConfigError>) -> String {
        match r {
            Ok(cli) => panic!("expected an error, parsed {cli:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_file_sets_what_flags_and_environment_do_not() {
        let cli = parse_with(
            "node_id = \"n1\"\nmax_runs = 3\ninsecure_registries = [\"a:5000\", \"b:5000\"]\nallow_private = true\nstate_dir = \"/srv/x\"\ngrace = 2.5\n",
            &[],
            &[],
        )
        .expect("parses");
        assert_eq!(
            cli,
            Cli {
                node_id: "n1".into(),
                max_runs: 3,
                insecure_registries: vec!["a:5000".into(), "b:5000".into()],
                allow_private: true,
                state_dir: Some(PathBuf::from("/srv/x")),
                grace: 2.5,
            }
        );
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file() {
        /// Its own variable: clap reads the process's environment, shared by the tests.
        #[derive(Debug, Parser)]
        struct Own {
            #[arg(long, env = "BERTH_CONFIG_FILE_TEST_LEVEL", default_value_t = 1)]
            level: u32,
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("own.toml");
        std::fs::write(&path, "level = 3\n").expect("write");
        let p = path.display().to_string();
        let parse = |argv: &[&str]| {
            let mut full = vec!["own", "--config", &p];
            full.extend_from_slice(argv);
            try_parse_from::<Own, _, _>("own", full, |_| None).map(|o| o.level)
        };
        assert_eq!(parse(&[]).expect("parses"), 3);
        std::env::set_var("BERTH_CONFIG_FILE_TEST_LEVEL", "4");
        assert_eq!(parse(&[]).expect("parses"), 4);
        assert_eq!(parse(&["--level", "5"]).expect("parses"), 5);
        std::env::remove_var("BERTH_CONFIG_FILE_TEST_LEVEL");
        let cli = parse_with("node_id = \"file\"\n", &["--node-id", "flag"], &[]).expect("parses");
        assert_eq!(cli.node_id, "flag");
        // Without the file's value, the built-in default.
        let cli = parse_with("node_id = \"n\"\n", &[], &[]).expect("parses");
        assert_eq!(cli.max_runs, 8);
    }

    #[test]
    fn dashed_keys_are_the_same_setting() {
        let cli = parse_with("node-id = \"n\"\nmax-runs = 2\n", &[], &[]).expect("parses");
        assert_eq!(cli.max_runs, 2);
        let twice = message(parse_with("node_id = \"a\"\nnode-id = \"b\"\n", &[], &[]));
        assert!(twice.contains("set twice"), "{twice}");
    }

    #[test]
    fn an_unknown_key_is_named_with_the_closest_known_one() {
        let e = message(parse_with("node_id = \"n\"\nmax_rns = 2\n", &[], &[]));
        assert!(e.contains("unknown key `max_rns`"), "{e}");
        assert!(e.contains("did you mean `max_runs`"), "{e}");
        let e = message(parse_with("node_id = \"n\"\ncolour = 2\n", &[], &[]));
        assert!(
            e.contains("unknown key `colour`") && e.contains("docs/CONFIG.md"),
            "{e}"
        );
        // `config` itself, `help` and `version` are not settings of the file.
        for key in ["config", "help"] {
            let e = message(parse_with(
                &format!("{key} = \"x\"\n"),
                &["--node-id", "n"],
                &[],
            ));
            assert!(e.contains(&format!("unknown key `{key}`")), "{e}");
        }
    }

    #[test]
    fn a_bad_value_names_the_key_and_the_reason() {
        let e = message(parse_with("node_id = \"n\"\nmax_runs = 0\n", &[], &[]));
        assert!(
            e.contains("key `max_runs`") && e.contains("0 is not in 1..=1000"),
            "{e}"
        );
        let e = message(parse_with(
            "node_id = \"n\"\nmax_runs = \"many\"\n",
            &[],
            &[],
        ));
        assert!(
            e.contains("key `max_runs`") && e.contains("invalid digit"),
            "{e}"
        );
        let e = message(parse_with(
            "node_id = \"n\"\nallow_private = \"yes\"\n",
            &[],
            &[],
        ));
        assert!(
            e.contains("key `allow_private`: expects true or false"),
            "{e}"
        );
        let e = message(parse_with("node_id = [\"a\", \"b\"]\n", &[], &[]));
        assert!(
            e.contains("key `node_id`: expects one value, not a list"),
            "{e}"
        );
        let e = message(parse_with("node_id = { a = 1 }\n", &[], &[]));
        assert!(
            e.contains("key `node_id`: expects a string or a number"),
            "{e}"
        );
        let e = message(parse_with("node_id = \"n\"\nmax_runs = \n", &[], &[]));
        assert!(e.contains("not valid TOML") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn a_bad_value_given_by_flag_is_clap_s_error_not_the_file_s() {
        match parse_with("node_id = \"n\"\nmax_runs = 2\n", &["--max-runs", "0"], &[]) {
            Err(ConfigError::Cli(e)) => {
                assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation)
            }
            other => panic!("expected clap's error, got {other:?}"),
        }
    }

    #[test]
    fn a_required_setting_may_come_from_the_file_only_or_must_be_given() {
        match parse_with("max_runs = 2\n", &[], &[]) {
            Err(ConfigError::Cli(e)) => {
                assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument)
            }
            other => panic!("expected a missing --node-id, got {other:?}"),
        }
    }

    #[test]
    fn the_config_file_is_found_by_flag_then_environment_then_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.toml");
        std::fs::write(&path, "node_id = \"env\"\n").expect("write");
        let p = path.display().to_string();
        let cli: Cli = try_parse_from("test", ["berth-test"], |k| {
            (k == "BERTH_TEST_CONFIG").then(|| OsString::from(&p))
        })
        .expect("parses");
        assert_eq!(cli.node_id, "env");
        let cli: Cli = try_parse_from("test", ["berth-test", &format!("--config={p}")], |_| None)
            .expect("parses");
        assert_eq!(cli.node_id, "env");
        // A named file must exist; the default one may be missing.
        let missing = dir.path().join("missing.toml").display().to_string();
        match try_parse_from::<Cli, _, _>("test", ["berth-test", "--config", &missing], |_| None) {
            Err(ConfigError::Read { path, .. }) => assert!(path.ends_with("missing.toml")),
            other => panic!("expected a read error, got {other:?}"),
        }
        let cli: Cli =
            try_parse_from("test-none", ["berth-test", "--node-id", "n"], |_| None).expect("ok");
        assert_eq!(cli.max_runs, 8);
        assert_eq!(env_var("node-agent"), "BERTH_NODE_AGENT_CONFIG");
    }

    #[test]
    fn the_reference_lists_every_setting_with_its_default() {
        let table = reference(&Cli::command(), "test");
        assert!(table.contains("| `max_runs` | `--max-runs MAX_RUNS` | `BERTH_T_MAX_RUNS` | `8` | Most runs at once |"), "{table}");
        assert!(
            table.contains("| `node_id` |") && table.contains("| required |"),
            "{table}"
        );
        assert!(
            table.contains("| `allow_private` | `--allow-private` | `BERTH_T_ALLOW` | `false` |"),
            "{table}"
        );
        assert!(
            table.contains(
                "| — | `--config FILE` | `BERTH_TEST_CONFIG` | `/etc/berth/test.toml` if present |"
            ),
            "{table}"
        );
        assert!(!table.contains("--help"), "{table}");
    }

    #[test]
    fn sections_are_replaced_between_their_markers() {
        let page = "a\n<!-- begin x -->\nold\n<!-- end x -->\nb\n";
        assert_eq!(
            replace_section(page, "x", "new\n").as_deref(),
            Some("a\n<!-- begin x -->\nnew\n<!-- end x -->\nb\n")
        );
        assert_eq!(replace_section(page, "y", "new\n"), None);
    }
}
