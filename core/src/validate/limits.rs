//! Every limit the API documents, one constant each: the checks and the OpenAPI document (a test
//! compares them) read them from here.

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
/// A runner's `max_concurrent_runs`.
pub const MAX_CONCURRENT_RUNS_MIN: i64 = 1;
pub const MAX_CONCURRENT_RUNS_MAX: i64 = 10_000;
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
/// The longest registry `username`, in characters…
pub const REGISTRY_USERNAME_MAX: usize = 255;
/// …and `password`, in bytes.
pub const REGISTRY_PASSWORD_MAX: usize = 4_096;
