//! Pure validation of what users send. Every check names the field it is about, so the API can
//! answer `{"errors": [{"field": "name", "message": "…"}]}`.
//!
//! Inputs arrive as `*Input` structs whose fields are all optional (so a missing field is a
//! validation error naming it, not a parse error), and leave as checked model values.

use crate::model::{Catalog, EnvVar, RunFile, RunnerSpec};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

pub const NAME_MIN: usize = 3;
pub const NAME_MAX: usize = 50;
pub const RUN_COMMAND_MAX: usize = 1_000;
pub const RUN_OVERRIDE_COMMAND_MAX: usize = 4_000;
pub const ARGV_MAX_ELEMENTS: usize = 200;
pub const ARGV_MAX_TOTAL_CHARS: usize = 8_000;
pub const ENTRYPOINT_MAX: usize = 500;
pub const TIMEOUT_MIN: i64 = 1;
pub const TIMEOUT_MAX: i64 = 86_400;
pub const TIMEOUT_DEFAULT: u32 = 3_600;
pub const ENV_MAX_VARIABLES: usize = 200;
pub const ENV_VALUE_MAX: usize = 32_768;
/// Seconds between SIGTERM and SIGKILL a runner or run may ask for (`stop_grace_seconds`).
pub const STOP_GRACE_MIN: i64 = 1;
pub const STOP_GRACE_MAX: i64 = 300;
/// Uploaded files (`files` of a run): at most this many per run…
pub const FILES_MAX: usize = 64;
/// …of at most this many bytes in total, decoded.
pub const FILES_MAX_TOTAL_BYTES: usize = 1024 * 1024;
/// The longest file path, in bytes (Linux `PATH_MAX`), and the longest path component.
pub const FILE_PATH_MAX: usize = 4_096;
pub const FILE_NAME_MAX: usize = 255;
/// The largest `mode` (permission bits only: no setuid, setgid or sticky bit).
pub const FILE_MODE_MAX: i64 = 0o777;
/// `mode` when a file does not give one: read-only for everyone.
pub const FILE_MODE_DEFAULT: u32 = 0o444;
/// Top-level directories files may not be placed under (the kernel's, mounted over anyway).
pub const FILE_FORBIDDEN_ROOTS: [&str; 3] = ["proc", "sys", "dev"];

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
struct Collector(Vec<FieldError>);

impl Collector {
    fn push(&mut self, field: &str, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.to_owned(),
            message: message.into(),
        });
    }

    fn finish<T>(self, value: T) -> Result<T, ValidationErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ValidationErrors(self.0))
        }
    }
}

/// `POST /v1/runners` and `PATCH /v1/runners/{id}` body.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunnerInput {
    /// 3 to 50 characters. Required on create.
    #[schema(min_length = 3, max_length = 50)]
    pub name: Option<String>,
    /// A repository name (`busybox`, `registry.example:5000/team/app`). Required on create.
    pub image_name: Option<String>,
    /// A tag (letters, digits, `_`, `.`, `-`; at most 128) or `sha256:` digest. Required on
    /// create.
    #[schema(pattern = r"^([A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|sha256:[0-9a-fA-F]{64})$")]
    pub image_tag: Option<String>,
    /// Shell form, run as `sh -c`: 1 to 1,000 characters, not blank. Mutually exclusive with
    /// `argv`.
    #[schema(min_length = 1, max_length = 1000)]
    pub run_command: Option<String>,
    /// Exec form (no shell): at most 200 elements and 8,000 characters in total. Mutually
    /// exclusive with `run_command`.
    #[schema(max_items = 200)]
    pub argv: Option<Vec<String>>,
    /// At most 500 characters, split into words like a shell would (quotes allowed).
    #[schema(max_length = 500)]
    pub entrypoint: Option<String>,
    /// 1 to 86,400; 3,600 when absent on create.
    #[schema(minimum = 1, maximum = 86400)]
    pub timeout_seconds: Option<i64>,
    /// One of `GET /v1/regions`. Required on create.
    pub region: Option<String>,
    /// One of `GET /v1/instance_types`. Required on create.
    pub instance_type: Option<String>,
    /// At most 200 variables.
    #[schema(max_items = 200)]
    pub env_variables: Option<Vec<EnvVar>>,
    /// A private registry (`POST /v1/container_registries`) to pull the image from; `""`
    /// detaches (PATCH).
    pub container_registry_id: Option<String>,
    /// Seconds between SIGTERM and SIGKILL for this runner's runs, 1 to 300; unset: the
    /// scheduler's default.
    #[schema(minimum = 1, maximum = 300)]
    pub stop_grace_seconds: Option<i64>,
}

impl RunnerInput {
    pub fn into_spec(self, catalog: &Catalog) -> Result<RunnerSpec, ValidationErrors> {
        let mut c = Collector::default();
        let mut missing = Vec::new();
        let mut require = |field: &'static str, v: Option<String>| {
            v.unwrap_or_else(|| {
                c.push(field, "is required");
                missing.push(field);
                String::new()
            })
        };
        let spec = RunnerSpec {
            name: require("name", self.name),
            image_name: require("image_name", self.image_name),
            image_tag: require("image_tag", self.image_tag),
            region: require("region", self.region),
            instance_type: require("instance_type", self.instance_type),
            run_command: self.run_command,
            argv: self.argv.unwrap_or_default(),
            entrypoint: self.entrypoint,
            timeout_seconds: 0,
            env_variables: self.env_variables.unwrap_or_default(),
            container_registry_id: self.container_registry_id.filter(|id| !id.is_empty()),
            stop_grace_seconds: check_stop_grace(&mut c, self.stop_grace_seconds),
        };
        let timeout = check_timeout(&mut c, self.timeout_seconds);
        let spec = RunnerSpec {
            timeout_seconds: timeout,
            ..spec
        };
        check_spec(&mut c, &spec, &missing, catalog);
        c.finish(spec)
    }
}

impl RunnerInput {
    /// Applies this as a `PATCH /v1/runners/{id}` body: present fields replace the runner's.
    /// Setting `run_command` clears `argv` and the other way round, since a runner has one or
    /// the other.
    pub fn apply(
        self,
        current: &RunnerSpec,
        catalog: &Catalog,
    ) -> Result<RunnerSpec, ValidationErrors> {
        let mut c = Collector::default();
        if self.run_command.is_some() && self.argv.is_some() {
            c.push("argv", "argv and run_command are mutually exclusive");
        }
        let mut next = current.clone();
        if let Some(v) = self.name {
            next.name = v;
        }
        if let Some(v) = self.image_name {
            next.image_name = v;
        }
        if let Some(v) = self.image_tag {
            next.image_tag = v;
        }
        if let Some(v) = self.run_command {
            next.run_command = Some(v);
            next.argv.clear();
        }
        if let Some(v) = self.argv {
            next.argv = v;
            next.run_command = None;
        }
        if let Some(v) = self.entrypoint {
            next.entrypoint = Some(v);
        }
        if self.timeout_seconds.is_some() {
            next.timeout_seconds = check_timeout(&mut c, self.timeout_seconds);
        }
        if let Some(v) = self.region {
            next.region = v;
        }
        if let Some(v) = self.instance_type {
            next.instance_type = v;
        }
        if let Some(v) = self.env_variables {
            next.env_variables = v;
        }
        if let Some(v) = self.container_registry_id {
            // An empty string detaches the runner from its registry.
            next.container_registry_id = (!v.is_empty()).then_some(v);
        }
        if self.stop_grace_seconds.is_some() {
            next.stop_grace_seconds = check_stop_grace(&mut c, self.stop_grace_seconds);
        }
        check_spec(&mut c, &next, &[], catalog);
        c.finish(next)
    }
}

/// `POST /v1/runners/{id}/runs` body: per-run overrides.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
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
}

/// One item of a run's `files`: `{"path": "/etc/app/config.json", "content_base64": "…",
/// "mode": 420}`. `path` is absolute and normalised (no `.`, `..` or empty components, no
/// trailing slash, no NUL, at most [`FILE_PATH_MAX`] bytes, not `/`, not under `/proc`, `/sys`
/// or `/dev`, unique within the run); `content_base64` is standard base64 (with padding);
/// `mode` holds permission bits, 0 to 0o777 (511), default [`FILE_MODE_DEFAULT`] (0o444 = 292).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileInput {
    /// Absolute, normalised, at most 4,096 bytes; not under `/proc`, `/sys` or `/dev`.
    #[schema(pattern = "^/", max_length = 4096)]
    pub path: Option<String>,
    /// The content, standard base64 with padding.
    pub content_base64: Option<String>,
    /// Permission bits, 0 to 511 (0o777); default 292 (0o444).
    #[schema(minimum = 0, maximum = 511)]
    pub mode: Option<i64>,
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
        check_stop_grace(&mut c, self.stop_grace_seconds);
        c.finish(self)
    }
}

/// Validates every item of a batch; the errors of item `i` are named `runs[i].field`.
pub fn validate_batch(items: Vec<RunInput>) -> Result<Vec<RunInput>, ValidationErrors> {
    let mut errors = Vec::new();
    let mut checked = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        match item.validate() {
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

/// `POST /v1/container_registries` body.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryInput {
    /// 3 to 50 characters. Required.
    #[schema(min_length = 3, max_length = 50)]
    pub name: Option<String>,
    /// `registry.example.com` or `10.0.0.5:5000`. Required.
    pub host: Option<String>,
    /// At most 255 characters, without `:`. Required.
    #[schema(max_length = 255, pattern = "^[^:]*$")]
    pub username: Option<String>,
    /// At most 4,096 bytes; never returned. Required.
    pub password: Option<String>,
}

/// A checked `RegistryInput`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrySpec {
    pub name: String,
    pub host: String,
    pub username: String,
    pub password: String,
}

pub const REGISTRY_USERNAME_MAX: usize = 255;
pub const REGISTRY_PASSWORD_MAX: usize = 4_096;

impl RegistryInput {
    pub fn validate(self) -> Result<RegistrySpec, ValidationErrors> {
        let mut c = Collector::default();
        let (name_given, host_given) = (self.name.is_some(), self.host.is_some());
        let mut require = |field: &str, v: Option<String>| {
            v.unwrap_or_else(|| {
                c.push(field, "is required");
                String::new()
            })
        };
        let spec = RegistrySpec {
            name: require("name", self.name),
            host: require("host", self.host),
            username: require("username", self.username),
            password: require("password", self.password),
        };
        let len = spec.name.chars().count();
        if name_given && !(NAME_MIN..=NAME_MAX).contains(&len) {
            c.push(
                "name",
                format!("must be {NAME_MIN} to {NAME_MAX} characters long"),
            );
        }
        if host_given && !is_host(&spec.host) {
            c.push(
                "host",
                "must be a registry host such as `registry.example.com` or `10.0.0.5:5000`",
            );
        }
        if spec.username.chars().count() > REGISTRY_USERNAME_MAX || spec.username.contains(':') {
            c.push(
                "username",
                format!("must be at most {REGISTRY_USERNAME_MAX} characters, without `:`"),
            );
        }
        if spec.password.len() > REGISTRY_PASSWORD_MAX {
            c.push(
                "password",
                format!("must be at most {REGISTRY_PASSWORD_MAX} bytes"),
            );
        }
        c.finish(spec)
    }
}

/// Re-checks a complete spec (the scheduler does this for specs that arrive over gRPC).
pub fn validate_spec(spec: &RunnerSpec, catalog: &Catalog) -> Result<(), ValidationErrors> {
    let mut c = Collector::default();
    if !(TIMEOUT_MIN..=TIMEOUT_MAX).contains(&i64::from(spec.timeout_seconds)) {
        c.push(
            "timeout_seconds",
            format!("must be between {TIMEOUT_MIN} and {TIMEOUT_MAX}"),
        );
    }
    check_stop_grace(&mut c, spec.stop_grace_seconds.map(i64::from));
    check_spec(&mut c, spec, &[], catalog);
    c.finish(())
}

fn check_timeout(c: &mut Collector, v: Option<i64>) -> u32 {
    match v {
        None => TIMEOUT_DEFAULT,
        Some(t) if (TIMEOUT_MIN..=TIMEOUT_MAX).contains(&t) => u32::try_from(t).unwrap_or(0),
        Some(_) => {
            c.push(
                "timeout_seconds",
                format!("must be between {TIMEOUT_MIN} and {TIMEOUT_MAX}"),
            );
            0
        }
    }
}

fn check_stop_grace(c: &mut Collector, v: Option<i64>) -> Option<u32> {
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

/// Checks every file (errors name `files[i].field`) and the limits of the whole set; returns
/// the files that are valid, decoded, as (path, mode, content).
fn check_files(c: &mut Collector, files: &[FileInput]) -> Vec<(String, u32, Vec<u8>)> {
    if files.len() > FILES_MAX {
        c.push("files", format!("must hold at most {FILES_MAX} files"));
    }
    let mut out: Vec<(String, u32, Vec<u8>)> = Vec::with_capacity(files.len());
    let mut paths: Vec<(usize, &str)> = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        let field = |name: &str| format!("files[{i}].{name}");
        let path = match f.path.as_deref() {
            None => {
                c.push(&field("path"), "is required");
                None
            }
            Some(p) => match file_path_problem(p) {
                Some(problem) => {
                    c.push(&field("path"), problem);
                    None
                }
                None => Some(p),
            },
        };
        if let Some(p) = path {
            match paths.iter().find(|(_, other)| paths_clash(p, other)) {
                Some((j, other)) if *other == p => {
                    c.push(&field("path"), format!("duplicates files[{j}].path"));
                }
                Some((j, _)) => c.push(
                    &field("path"),
                    format!("conflicts with files[{j}].path: a file cannot also be a directory"),
                ),
                None => paths.push((i, p)),
            }
        }
        let content = match f.content_base64.as_deref() {
            None => {
                c.push(&field("content_base64"), "is required");
                None
            }
            Some(b64) => match base64::engine::general_purpose::STANDARD.decode(b64) {
                Ok(bytes) => Some(bytes),
                Err(e) => {
                    c.push(
                        &field("content_base64"),
                        format!("must be standard base64 (with padding): {e}"),
                    );
                    None
                }
            },
        };
        let mode = match f.mode {
            None => Some(FILE_MODE_DEFAULT),
            Some(m) if (0..=FILE_MODE_MAX).contains(&m) => u32::try_from(m).ok(),
            Some(_) => {
                c.push(
                    &field("mode"),
                    format!("must be permission bits between 0 and {FILE_MODE_MAX} (0o777)"),
                );
                None
            }
        };
        if let (Some(path), Some(content), Some(mode)) = (path, content, mode) {
            out.push((path.to_owned(), mode, content));
        }
    }
    let total: usize = out.iter().map(|(_, _, content)| content.len()).sum();
    if total > FILES_MAX_TOTAL_BYTES {
        c.push(
            "files",
            format!(
                "must hold at most {FILES_MAX_TOTAL_BYTES} bytes in total (decoded), not {total}"
            ),
        );
    }
    out
}

/// Why `p` cannot be an uploaded file's path, if it cannot.
pub fn file_path_problem(p: &str) -> Option<String> {
    if p.len() > FILE_PATH_MAX {
        return Some(format!("must be at most {FILE_PATH_MAX} bytes long"));
    }
    if p.contains('\0') {
        return Some("must not contain NUL characters".to_owned());
    }
    let Some(rest) = p.strip_prefix('/') else {
        return Some("must be an absolute path".to_owned());
    };
    if rest.is_empty() {
        return Some("must name a file, not `/`".to_owned());
    }
    if rest.ends_with('/') {
        return Some("must not end with `/`".to_owned());
    }
    for part in rest.split('/') {
        match part {
            "" => return Some("must not contain empty components (`//`)".to_owned()),
            "." | ".." => return Some("must be normalised: no `.` or `..` components".to_owned()),
            long if long.len() > FILE_NAME_MAX => {
                return Some(format!(
                    "must not have a component longer than {FILE_NAME_MAX} bytes"
                ))
            }
            _ => {}
        }
    }
    let top = rest.split('/').next().unwrap_or_default();
    if FILE_FORBIDDEN_ROOTS.contains(&top) {
        return Some(format!("must not be `/{top}` or under it"));
    }
    None
}

/// Two normalised paths that cannot both be files: equal, or one a directory of the other.
fn paths_clash(a: &str, b: &str) -> bool {
    let under = |long: &str, short: &str| {
        long.strip_prefix(short)
            .is_some_and(|rest| rest.starts_with('/'))
    };
    a == b || under(a, b) || under(b, a)
}

/// `missing`: the required fields absent from a create, already reported as "is required".
/// A field given as `""` is checked like any other value (and fails).
fn check_spec(c: &mut Collector, s: &RunnerSpec, missing: &[&str], catalog: &Catalog) {
    let given = |field: &str| !missing.contains(&field);
    let name_len = s.name.chars().count();
    if given("name") && !(NAME_MIN..=NAME_MAX).contains(&name_len) {
        c.push(
            "name",
            format!("must be {NAME_MIN} to {NAME_MAX} characters long"),
        );
    }
    if given("image_name") && !is_image_name(&s.image_name) {
        c.push(
            "image_name",
            "must be a repository name such as `busybox` or `registry.example:5000/team/app`",
        );
    }
    if given("image_tag") && !is_image_tag(&s.image_tag) {
        c.push(
            "image_tag",
            "must be a tag (letters, digits, `_`, `.`, `-`, at most 128) or a sha256 digest",
        );
    }
    if let Some(cmd) = &s.run_command {
        check_command(c, "run_command", cmd, RUN_COMMAND_MAX);
        if !s.argv.is_empty() {
            c.push("argv", "argv and run_command are mutually exclusive");
        }
    }
    check_argv(c, &s.argv);
    if let Some(ep) = &s.entrypoint {
        check_entrypoint(c, ep);
    }
    if given("region") && !catalog.has_region(&s.region) {
        c.push(
            "region",
            format!("unknown region; known: {}", catalog.regions.join(", ")),
        );
    }
    if given("instance_type") && catalog.instance_type(&s.instance_type).is_none() {
        let known: Vec<&str> = catalog
            .instance_types
            .iter()
            .map(|t| t.slug.as_str())
            .collect();
        c.push(
            "instance_type",
            format!("unknown instance type; known: {}", known.join(", ")),
        );
    }
    check_env(c, &s.env_variables);
}

fn check_command(c: &mut Collector, field: &str, cmd: &str, max: usize) {
    let len = cmd.chars().count();
    if cmd.trim().is_empty() {
        c.push(field, "must not be empty");
    } else if len > max {
        c.push(field, format!("must be at most {max} characters"));
    }
}

fn check_argv(c: &mut Collector, argv: &[String]) {
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

fn check_entrypoint(c: &mut Collector, ep: &str) {
    if ep.chars().count() > ENTRYPOINT_MAX {
        c.push(
            "entrypoint",
            format!("must be at most {ENTRYPOINT_MAX} characters"),
        );
    } else if let Err(e) = crate::command::split_words(ep) {
        c.push("entrypoint", e.to_string());
    }
}

fn check_env(c: &mut Collector, env: &[EnvVar]) {
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

pub fn is_env_key(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && chars.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// `[host[:port]/]path` where path components are lowercase alphanumerics joined by `.`, `_`,
/// `__` or `-`, as the distribution spec defines repository names.
pub fn is_image_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 {
        let first = parts[0];
        let looks_like_host = first.contains('.') || first.contains(':') || first == "localhost";
        if looks_like_host {
            if !is_host(first) {
                return false;
            }
            parts.remove(0);
        }
    }
    !parts.is_empty() && parts.iter().all(|p| is_path_component(p))
}

pub fn is_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok());
    let host_ok = !host.is_empty()
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    port_ok && host_ok
}

fn is_path_component(p: &str) -> bool {
    let bytes = p.as_bytes();
    if bytes.is_empty() {
        return false;
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut prev_sep = false;
    for &b in bytes {
        if alnum(b) {
            prev_sep = false;
        } else if matches!(b, b'.' | b'_' | b'-') {
            // `__` is allowed, other doubled separators are not (except runs of `-`).
            if prev_sep && b != b'-' && b != b'_' {
                return false;
            }
            prev_sep = true;
        } else {
            return false;
        }
    }
    true
}

pub fn is_image_tag(tag: &str) -> bool {
    if let Some(hex) = tag.strip_prefix("sha256:") {
        return hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit());
    }
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> RunnerInput {
        RunnerInput {
            name: Some("hello".into()),
            image_name: Some("busybox".into()),
            image_tag: Some("latest".into()),
            run_command: Some("echo hi".into()),
            region: Some("fra".into()),
            instance_type: Some("standard-s".into()),
            ..Default::default()
        }
    }

    fn fields(r: Result<RunnerSpec, ValidationErrors>) -> Vec<String> {
        match r {
            Ok(_) => vec![],
            Err(e) => e.0.into_iter().map(|f| f.field).collect(),
        }
    }

    #[test]
    fn a_good_runner_passes_with_the_default_timeout() {
        let spec = good().into_spec(&Catalog::default());
        assert_eq!(spec.map(|s| s.timeout_seconds), Ok(TIMEOUT_DEFAULT));
    }

    #[test]
    fn missing_fields_are_named() {
        let f = fields(RunnerInput::default().into_spec(&Catalog::default()));
        for want in ["name", "image_name", "image_tag", "region", "instance_type"] {
            assert!(f.contains(&want.to_string()), "{want} missing from {f:?}");
        }
    }

    #[test]
    fn name_length_boundaries() {
        for (name, ok) in [
            ("ab", false),
            ("abc", true),
            (&"a".repeat(50), true),
            (&"a".repeat(51), false),
        ] {
            let r = RunnerInput {
                name: Some(name.to_string()),
                ..good()
            }
            .into_spec(&Catalog::default());
            assert_eq!(r.is_ok(), ok, "name of {} chars", name.len());
        }
    }

    #[test]
    fn timeout_boundaries() {
        for (t, ok) in [
            (0, false),
            (1, true),
            (86_400, true),
            (86_401, false),
            (-5, false),
        ] {
            let r = RunnerInput {
                timeout_seconds: Some(t),
                ..good()
            }
            .into_spec(&Catalog::default());
            assert_eq!(r.is_ok(), ok, "timeout {t}");
        }
    }

    #[test]
    fn run_command_and_argv_are_exclusive() {
        let r = RunnerInput {
            argv: Some(vec!["echo".into()]),
            ..good()
        }
        .into_spec(&Catalog::default());
        assert_eq!(fields(r), vec!["argv".to_string()]);
    }

    #[test]
    fn unknown_region_and_instance_type_are_rejected() {
        let r = RunnerInput {
            region: Some("mars".into()),
            instance_type: Some("huge".into()),
            ..good()
        }
        .into_spec(&Catalog::default());
        assert_eq!(
            fields(r),
            vec!["region".to_string(), "instance_type".to_string()]
        );
    }

    #[test]
    fn env_keys_are_checked() {
        let r = RunnerInput {
            env_variables: Some(vec![
                EnvVar {
                    env_key: "GOOD_1".into(),
                    env_val: "x".into(),
                    secret: false,
                },
                EnvVar {
                    env_key: "1BAD".into(),
                    env_val: "x".into(),
                    secret: false,
                },
            ]),
            ..good()
        }
        .into_spec(&Catalog::default());
        assert_eq!(fields(r), vec!["env_variables[1].env_key".to_string()]);
    }

    #[test]
    fn registries_are_checked() {
        let good = RegistryInput {
            name: Some("private".into()),
            host: Some("127.0.0.1:5002".into()),
            username: Some("berth".into()),
            password: Some("s3cret".into()),
        };
        assert!(good.clone().validate().is_ok());
        let bad = RegistryInput {
            host: Some("not a host".into()),
            password: None,
            ..good
        }
        .validate();
        let fields: Vec<String> = bad
            .err()
            .map(|e| e.0.into_iter().map(|f| f.field).collect())
            .unwrap_or_default();
        assert_eq!(fields, vec!["password".to_string(), "host".to_string()]);
    }

    #[test]
    fn image_names() {
        for ok in [
            "busybox",
            "library/busybox",
            "127.0.0.1:5000/busybox",
            "localhost/a/b",
            "a__b",
            "a-b.c",
        ] {
            assert!(is_image_name(ok), "{ok}");
        }
        for bad in [
            "",
            "Busybox",
            "busybox/",
            "/busybox",
            "a..b",
            "host:99999/x",
            "a b",
        ] {
            assert!(!is_image_name(bad), "{bad}");
        }
    }

    #[test]
    fn patch_switches_between_command_forms() {
        let spec = good().into_spec(&Catalog::default()).ok();
        let patched = spec.as_ref().map(|s| {
            RunnerInput {
                argv: Some(vec!["echo".into(), "x".into()]),
                ..Default::default()
            }
            .apply(s, &Catalog::default())
        });
        let patched = patched.and_then(Result::ok);
        assert_eq!(patched.as_ref().map(|s| s.run_command.clone()), Some(None));
        assert_eq!(
            patched.map(|s| s.argv),
            Some(vec!["echo".to_string(), "x".to_string()])
        );
    }

    #[test]
    fn run_overrides_are_checked() {
        let r = RunInput {
            command: Some("x".repeat(4_001)),
            ..Default::default()
        }
        .validate();
        assert!(r.is_err());
        let r = RunInput {
            command: Some("x".repeat(4_000)),
            ..Default::default()
        }
        .validate();
        assert!(r.is_ok());
        let r = RunInput {
            command: Some("a".into()),
            argv: Some(vec!["b".into()]),
            ..Default::default()
        }
        .validate();
        assert!(r.is_err());
    }
    /// The fields a result's errors name (empty when it passed).
    fn named<T>(r: Result<T, ValidationErrors>) -> Vec<String> {
        r.err()
            .map(|e| e.0.into_iter().map(|f| f.field).collect())
            .unwrap_or_default()
    }

    fn runner_with(f: impl FnOnce(&mut RunnerInput)) -> Vec<String> {
        let mut input = good();
        f(&mut input);
        named(input.into_spec(&Catalog::default()))
    }

    fn run_with(f: impl FnOnce(&mut RunInput)) -> Vec<String> {
        let mut input = RunInput::default();
        f(&mut input);
        named(input.validate())
    }

    /// `(value, ok)` pairs: an ok one passes, a bad one fails naming exactly `field`.
    fn boundaries<V: Clone + std::fmt::Debug>(
        field: &str,
        cases: &[(V, bool)],
        check: impl Fn(V) -> Vec<String>,
    ) {
        for (v, ok) in cases {
            let got = check(v.clone());
            let want: Vec<String> = if *ok { vec![] } else { vec![field.to_owned()] };
            let shown = format!("{v:?}");
            assert_eq!(got, want, "{field} = {}", &shown[..shown.len().min(60)]);
        }
    }

    fn file(path: &str, b64: &str, mode: Option<i64>) -> FileInput {
        FileInput {
            path: Some(path.into()),
            content_base64: Some(b64.into()),
            mode,
        }
    }

    fn run_fields(input: RunInput) -> Vec<String> {
        match input.validate() {
            Ok(_) => vec![],
            Err(e) => e.0.into_iter().map(|f| f.field).collect(),
        }
    }

    fn with_files(files: Vec<FileInput>) -> RunInput {
        RunInput {
            files: Some(files),
            ..Default::default()
        }
    }

    #[test]
    fn name_is_3_to_50_characters_and_the_error_names_it() {
        boundaries(
            "name",
            &[
                ("ab".to_owned(), false),
                ("abc".to_owned(), true),
                ("a".repeat(50), true),
                ("a".repeat(51), false),
                ("é".repeat(50), true), // characters, not bytes
                ("é".repeat(51), false),
            ],
            |v| runner_with(|r| r.name = Some(v)),
        );
    }

    #[test]
    fn image_name_and_tag_are_required_and_well_formed() {
        assert_eq!(runner_with(|r| r.image_name = None), vec!["image_name"]);
        assert_eq!(runner_with(|r| r.image_tag = None), vec!["image_tag"]);
        boundaries(
            "image_name",
            &[
                ("busybox".to_owned(), true),
                ("127.0.0.1:5001/team/app".to_owned(), true),
                ("Busybox".to_owned(), false),
                ("".to_owned(), false),
                ("a b".to_owned(), false),
                ("busybox:latest".to_owned(), false),
            ],
            |v| runner_with(|r| r.image_name = Some(v)),
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        boundaries(
            "image_tag",
            &[
                ("latest".to_owned(), true),
                ("v1.2_3-rc".to_owned(), true),
                ("_x".to_owned(), true),
                ("a".repeat(128), true),
                ("a".repeat(129), false),
                ("".to_owned(), false),
                (".x".to_owned(), false),
                ("-x".to_owned(), false),
                ("a/b".to_owned(), false),
                (digest.clone(), true),
                (format!("sha256:{}", "a".repeat(63)), false),
                (format!("sha256:{}", "g".repeat(64)), false),
            ],
            |v| runner_with(|r| r.image_tag = Some(v)),
        );
    }

    #[test]
    fn run_command_is_at_most_1000_characters() {
        boundaries(
            "run_command",
            &[
                ("x".repeat(1_000), true),
                ("x".repeat(1_001), false),
                ("é".repeat(1_000), true),
                ("".to_owned(), false),
                ("   ".to_owned(), false),
            ],
            |v| runner_with(|r| r.run_command = Some(v)),
        );
    }

    #[test]
    fn a_run_command_override_is_at_most_4000_characters() {
        boundaries(
            "command",
            &[
                ("x".repeat(4_000), true),
                ("x".repeat(4_001), false),
                ("é".repeat(4_000), true),
                ("".to_owned(), false),
            ],
            |v| run_with(|r| r.command = Some(v)),
        );
    }

    /// `n` elements of `each` characters.
    fn argv(n: usize, each: usize) -> Vec<String> {
        vec!["a".repeat(each); n]
    }

    #[test]
    fn argv_is_at_most_200_elements_and_8000_characters() {
        let cases = [
            (argv(200, 1), true),
            (argv(201, 1), false),
            (argv(200, 40), true), // 8,000 characters in total
            (
                argv(199, 40)
                    .into_iter()
                    .chain([("a".repeat(41))])
                    .collect(),
                false,
            ), // 8,001
            (argv(1, 8_000), true),
            (argv(1, 8_001), false),
        ];
        boundaries("argv", &cases, |v| {
            runner_with(|r| {
                r.run_command = None;
                r.argv = Some(v);
            })
        });
        boundaries("argv", &cases, |v| run_with(|r| r.argv = Some(v)));
        // A run's argv replaces the runner's command, so it cannot be empty.
        assert_eq!(run_with(|r| r.argv = Some(vec![])), vec!["argv"]);
    }

    #[test]
    fn argv_excludes_run_command_and_command() {
        assert_eq!(
            runner_with(|r| r.argv = Some(vec!["echo".into()])),
            vec!["argv"]
        );
        assert_eq!(
            run_with(|r| {
                r.argv = Some(vec!["echo".into()]);
                r.command = Some("echo".into());
            }),
            vec!["argv"]
        );
        let spec = good().into_spec(&Catalog::default());
        let both = RunnerInput {
            run_command: Some("echo".into()),
            argv: Some(vec!["echo".into()]),
            ..Default::default()
        };
        let patched = spec.map(|s| named(both.apply(&s, &Catalog::default())));
        assert_eq!(patched, Ok(vec!["argv".to_owned()]));
    }

    #[test]
    fn entrypoint_is_at_most_500_characters() {
        let cases = [
            ("x".repeat(500), true),
            ("x".repeat(501), false),
            ("é".repeat(500), true),
            ("sh -c 'unterminated".to_owned(), false),
        ];
        boundaries("entrypoint", &cases, |v| {
            runner_with(|r| r.entrypoint = Some(v))
        });
        boundaries("entrypoint", &cases, |v| {
            run_with(|r| r.entrypoint = Some(v))
        });
    }

    #[test]
    fn timeout_is_1_to_86400_and_defaults_to_3600() {
        boundaries(
            "timeout_seconds",
            &[
                (-1_i64, false),
                (0, false),
                (1, true),
                (86_400, true),
                (86_401, false),
                (i64::MAX, false),
            ],
            |v| runner_with(|r| r.timeout_seconds = Some(v)),
        );
        let spec = good().into_spec(&Catalog::default());
        assert_eq!(spec.map(|s| s.timeout_seconds), Ok(3_600));
    }

    #[test]
    fn env_keys_match_the_identifier_pattern() {
        let var = |k: &str| EnvVar {
            env_key: k.to_owned(),
            env_val: "v".to_owned(),
            secret: false,
        };
        for (key, ok) in [
            ("A", true),
            ("_", true),
            ("a1", true),
            ("_A_1_b", true),
            ("PATH", true),
            ("", false),
            ("1A", false),
            ("A-B", false),
            ("A B", false),
            ("A.B", false),
            ("É", false),
            ("A=", false),
        ] {
            let want: Vec<String> = if ok {
                vec![]
            } else {
                vec!["env_variables[0].env_key".to_owned()]
            };
            assert_eq!(
                runner_with(|r| r.env_variables = Some(vec![var(key)])),
                want,
                "runner env key {key:?}"
            );
            assert_eq!(
                run_with(|r| r.env_variables = Some(vec![var(key)])),
                want,
                "run env key {key:?}"
            );
        }
    }
    #[test]
    fn an_empty_string_is_a_value_that_fails_not_an_absent_field() {
        for field in ["name", "image_name", "image_tag", "region", "instance_type"] {
            let got = runner_with(|r| {
                let slot = match field {
                    "name" => &mut r.name,
                    "image_name" => &mut r.image_name,
                    "image_tag" => &mut r.image_tag,
                    "region" => &mut r.region,
                    _ => &mut r.instance_type,
                };
                *slot = Some(String::new());
            });
            assert_eq!(got, vec![field.to_owned()], "{field}: \"\"");
        }
        let registry = |name: &str, host: &str| {
            named(
                RegistryInput {
                    name: Some(name.into()),
                    host: Some(host.into()),
                    username: Some("u".into()),
                    password: Some("p".into()),
                }
                .validate(),
            )
        };
        assert_eq!(registry("", "127.0.0.1:5002"), vec!["name"]);
        assert_eq!(registry("abc", ""), vec!["host"]);
        assert_eq!(registry("ab", "127.0.0.1:5002"), vec!["name"]);
        assert_eq!(
            registry(&"a".repeat(50), "127.0.0.1:5002"),
            Vec::<String>::new()
        );
        assert_eq!(registry(&"a".repeat(51), "127.0.0.1:5002"), vec!["name"]);
    }

    #[test]
    fn files_decode_with_the_default_mode() {
        let input = with_files(vec![
            file("/etc/berth/config.json", "eyJhIjoxfQ==", None),
            file("/work/run.sh", "", Some(0o755)),
        ]);
        assert_eq!(run_fields(input.clone()), Vec::<String>::new());
        let files = input.decoded_files().unwrap_or_default();
        assert_eq!(files.len(), 2);
        assert_eq!(&files[0].content[..], br#"{"a":1}"#);
        assert_eq!(files[0].mode, FILE_MODE_DEFAULT);
        assert_eq!(files[1].mode, 0o755);
        assert!(files[1].content.is_empty());
    }

    #[test]
    fn bad_file_paths_are_named_by_index() {
        let longest_name = format!("/{}", "b".repeat(FILE_NAME_MAX));
        let name_too_long = format!("/{}", "b".repeat(FILE_NAME_MAX + 1));
        let one_long_component = format!("/{}", "a".repeat(FILE_PATH_MAX - 1));
        let too_long = format!("/{}", "a".repeat(FILE_PATH_MAX));
        for (path, ok) in [
            ("/a", true),
            ("/etc/x.conf", true),
            ("/.hidden/..x", true),
            ("/procfs/x", true),
            ("/device", true),
            (longest_name.as_str(), true),
            (name_too_long.as_str(), false),
            (one_long_component.as_str(), false),
            (too_long.as_str(), false),
            ("", false),
            ("/", false),
            ("relative/x", false),
            ("/etc/", false),
            ("/etc//x", false),
            ("/etc/./x", false),
            ("/etc/../x", false),
            ("/a/..", false),
            ("/a\0b", false),
            ("/proc", false),
            ("/proc/self/x", false),
            ("/sys/x", false),
            ("/dev/shm/x", false),
        ] {
            let f = run_fields(with_files(vec![
                file("/ok", "", None),
                file(path, "", None),
            ]));
            let want: Vec<String> = if ok {
                vec![]
            } else {
                vec!["files[1].path".into()]
            };
            assert_eq!(
                f,
                want,
                "path {:?}",
                path.chars().take(20).collect::<String>()
            );
        }
        // Exactly FILE_PATH_MAX bytes, in components of at most FILE_NAME_MAX, passes.
        let mut exact = String::new();
        while exact.len() + 201 <= FILE_PATH_MAX {
            exact.push('/');
            exact.push_str(&"d".repeat(200));
        }
        exact.push('/');
        exact.push_str(&"e".repeat(FILE_PATH_MAX - exact.len()));
        assert_eq!(exact.len(), FILE_PATH_MAX);
        assert_eq!(
            run_fields(with_files(vec![file(&exact, "", None)])),
            Vec::<String>::new()
        );
        let over = format!("{exact}e");
        assert_eq!(
            run_fields(with_files(vec![file(&over, "", None)])),
            vec!["files[0].path".to_string()]
        );
    }

    #[test]
    fn duplicate_and_nested_file_paths_are_rejected() {
        let f = run_fields(with_files(vec![
            file("/a/b", "", None),
            file("/a/b", "", None),
            file("/a/b/c", "", None),
            file("/a", "", None),
            file("/a/bc", "", None),
        ]));
        assert_eq!(
            f,
            vec![
                "files[1].path".to_string(),
                "files[2].path".to_string(),
                "files[3].path".to_string()
            ]
        );
    }

    #[test]
    fn file_content_must_be_standard_base64() {
        for (b64, ok) in [
            ("aGVsbG8=", true),
            ("", true),
            ("aGVsbG8", false),  // padding missing
            ("aGVsbG8*", false), // not in the alphabet
            ("aGV-bG8_", false), // URL-safe alphabet
            ("a", false),
        ] {
            let f = run_fields(with_files(vec![file("/x", b64, None)]));
            let want: Vec<String> = if ok {
                vec![]
            } else {
                vec!["files[0].content_base64".into()]
            };
            assert_eq!(f, want, "{b64:?}");
        }
        let missing = FileInput {
            path: None,
            content_base64: None,
            mode: None,
        };
        assert_eq!(
            run_fields(with_files(vec![missing])),
            vec![
                "files[0].path".to_string(),
                "files[0].content_base64".to_string()
            ]
        );
    }

    #[test]
    fn file_mode_boundaries() {
        for (mode, ok) in [
            (0, true),
            (0o777, true),
            (0o1000, false),
            (-1, false),
            (0o4755, false),
        ] {
            let f = run_fields(with_files(vec![file("/x", "", Some(mode))]));
            assert_eq!(f.is_empty(), ok, "mode {mode:o}");
            if !ok {
                assert_eq!(f, vec!["files[0].mode".to_string()]);
            }
        }
    }

    #[test]
    fn file_count_and_total_size_boundaries() {
        let many = |n: usize| (0..n).map(|i| file(&format!("/f{i}"), "", None)).collect();
        assert!(run_fields(with_files(many(FILES_MAX))).is_empty());
        assert_eq!(
            run_fields(with_files(many(FILES_MAX + 1))),
            vec!["files".to_string()]
        );
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
        let half = FILES_MAX_TOTAL_BYTES / 2;
        let exact = vec![file("/a", &b64(half), None), file("/b", &b64(half), None)];
        assert!(run_fields(with_files(exact)).is_empty());
        let over = vec![
            file("/a", &b64(half), None),
            file("/b", &b64(half + 1), None),
        ];
        assert_eq!(run_fields(with_files(over)), vec!["files".to_string()]);
    }

    #[test]
    fn batch_file_errors_name_the_item() {
        let items = vec![
            RunInput::default(),
            with_files(vec![file("/ok", "", None), file("/x", "!", None)]),
        ];
        let fields: Vec<String> = validate_batch(items)
            .err()
            .map(|e| e.0.into_iter().map(|f| f.field).collect())
            .unwrap_or_default();
        assert_eq!(fields, vec!["runs[1].files[1].content_base64".to_string()]);
    }

    #[test]
    fn stop_grace_boundaries() {
        for (g, ok) in [
            (0, false),
            (1, true),
            (300, true),
            (301, false),
            (-1, false),
        ] {
            let r = RunInput {
                stop_grace_seconds: Some(g),
                ..Default::default()
            };
            assert_eq!(run_fields(r).is_empty(), ok, "run grace {g}");
            let r = RunnerInput {
                stop_grace_seconds: Some(g),
                ..good()
            }
            .into_spec(&Catalog::default());
            assert_eq!(r.is_ok(), ok, "runner grace {g}");
        }
        let spec = RunnerInput {
            stop_grace_seconds: Some(30),
            ..good()
        }
        .into_spec(&Catalog::default());
        assert_eq!(spec.map(|s| s.stop_grace_seconds), Ok(Some(30)));
    }
}
