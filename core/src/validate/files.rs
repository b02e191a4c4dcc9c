//! The small files a run uploads (`files`): each one checked and decoded, and the set's limits.

use super::limits::*;
use super::Collector;
use base64::Engine as _;
use serde::Deserialize;

/// One item of a run's `files`: `{"path": "/etc/app/config.json", "content_base64": "…",
/// "mode": 420}`. `path` is absolute and normalised (no `.`, `..` or empty components, no
/// trailing slash, no NUL, at most [`FILE_PATH_MAX`] bytes, not `/`, not under `/proc`, `/sys`
/// or `/dev`, unique within the run); `content_base64` is standard base64 (with padding);
/// `mode` holds permission bits, 0 to 0o777 (511), default [`FILE_MODE_DEFAULT`] (0o444 = 292).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize, utoipa::ToSchema)]
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

/// Checks every file (errors name `files[i].field`) and the limits of the whole set; returns
/// the files that are valid, decoded, as (path, mode, content).
pub(super) fn check_files(c: &mut Collector, files: &[FileInput]) -> Vec<(String, u32, Vec<u8>)> {
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
        if let Some(problem) = path.and_then(|p| claim_path(&mut paths, i, p)) {
            c.push(&field("path"), problem);
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

/// Records file `i`'s (valid) path among the earlier files' `paths`, or says why it cannot be
/// placed beside them: it duplicates one, or one is a directory of the other.
pub fn claim_path<'a>(paths: &mut Vec<(usize, &'a str)>, i: usize, p: &'a str) -> Option<String> {
    match paths.iter().find(|(_, other)| paths_clash(p, other)) {
        Some((j, other)) if *other == p => Some(format!("duplicates files[{j}].path")),
        Some((j, _)) => Some(format!(
            "conflicts with files[{j}].path: a file cannot also be a directory"
        )),
        None => {
            paths.push((i, p));
            None
        }
    }
}

/// Two normalised paths that cannot both be files: equal, or one a directory of the other.
fn paths_clash(a: &str, b: &str) -> bool {
    let under = |long: &str, short: &str| {
        long.strip_prefix(short)
            .is_some_and(|rest| rest.starts_with('/'))
    };
    a == b || under(a, b) || under(b, a)
}
