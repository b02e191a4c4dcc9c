//! The checks on a run's uploaded files once they are decoded ([`RunFile`]s, as they travel
//! after the API): the rules of the API's check of the JSON input (`files` in
//! [`crate::validate::RunInput`]) that hold for bytes, with the same messages and the same field
//! names: `files` for the count and the total size, `files[i].path` and `files[i].mode` for one
//! file. Base64 is the API's business only; nothing here decodes or encodes it.

use crate::model::RunFile;
use crate::validate::{
    claim_path, file_path_problem, FieldError, FILES_MAX, FILES_MAX_TOTAL_BYTES, FILE_MODE_MAX,
};

/// Everything wrong with `files`, in the order the API's check reports it (per file: path,
/// then mode; then the total size). Empty when they may be placed.
pub fn check_decoded_files(files: &[RunFile]) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut push = |field: String, message: String| errors.push(FieldError { field, message });
    if files.len() > FILES_MAX {
        push(
            "files".to_owned(),
            format!("must hold at most {FILES_MAX} files"),
        );
    }
    let mut paths: Vec<(usize, &str)> = Vec::with_capacity(files.len());
    // As in the API's check, only files that are valid count toward the total.
    let mut total: u64 = 0;
    for (i, f) in files.iter().enumerate() {
        let field = |name: &str| format!("files[{i}].{name}");
        let path_ok = match file_path_problem(&f.path) {
            Some(problem) => {
                push(field("path"), problem);
                false
            }
            None => true,
        };
        if let Some(problem) = path_ok
            .then(|| claim_path(&mut paths, i, &f.path))
            .flatten()
        {
            push(field("path"), problem);
        }
        let mode_ok = i64::from(f.mode) <= FILE_MODE_MAX;
        if !mode_ok {
            push(
                field("mode"),
                format!("must be permission bits between 0 and {FILE_MODE_MAX} (0o777)"),
            );
        }
        if path_ok && mode_ok {
            total = total.saturating_add(f.size_bytes);
        }
    }
    if total > FILES_MAX_TOTAL_BYTES as u64 {
        push(
            "files".to_owned(),
            format!(
                "must hold at most {FILES_MAX_TOTAL_BYTES} bytes in total (decoded), not {total}"
            ),
        );
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{FileInput, RunInput, ValidationErrors};
    use base64::Engine as _;

    fn file(path: &str, mode: u32, content: &[u8]) -> RunFile {
        RunFile::new(path.to_owned(), mode, content.to_vec())
    }

    /// What the API's check of the same files, as JSON input, reports.
    fn api_errors(files: &[RunFile]) -> Vec<FieldError> {
        let input = RunInput {
            files: Some(
                files
                    .iter()
                    .map(|f| FileInput {
                        path: Some(f.path.clone()),
                        content_base64: Some(
                            base64::engine::general_purpose::STANDARD.encode(&f.content),
                        ),
                        mode: Some(i64::from(f.mode)),
                    })
                    .collect(),
            ),
            ..Default::default()
        };
        match input.validate() {
            Ok(_) => vec![],
            Err(ValidationErrors(errors)) => errors,
        }
    }

    #[test]
    fn decoded_files_fail_exactly_as_their_json_form_does() {
        let big = vec![0u8; FILES_MAX_TOTAL_BYTES / 2 + 1];
        let cases: Vec<Vec<RunFile>> = vec![
            vec![],
            vec![file("/etc/app.conf", 0o444, b"hello")],
            vec![file("/etc/x", 0o777, b""), file("/etc/y", 0, b"")],
            vec![file("etc/x", 0o444, b"")],
            vec![file("/", 0o444, b"")],
            vec![file("/etc/", 0o444, b"")],
            vec![file("/etc//x", 0o444, b"")],
            vec![file("/etc/../x", 0o444, b"")],
            vec![file("/proc/x", 0o444, b"")],
            vec![file("/dev", 0o444, b"")],
            vec![file("/nul\0", 0o444, b"")],
            vec![file(&format!("/{}", "a".repeat(256)), 0o444, b"")],
            vec![file(&format!("/{}", "a/".repeat(2100)), 0o444, b"")],
            vec![file("", 0o444, b"")],
            vec![file("/etc/x", 0o1000, b"")],
            vec![file("/etc/x", 0o4755, b"")],
            vec![file("/etc/x", 0o444, b""), file("/etc/x", 0o444, b"")],
            vec![file("/etc", 0o444, b""), file("/etc/x", 0o444, b"")],
            vec![file("/etc/x/y", 0o444, b""), file("/etc/x", 0o444, b"")],
            vec![file("/etc/xy", 0o444, b""), file("/etc/x", 0o444, b"")],
            vec![file("/a", 0o444, &big), file("/b", 0o444, &big)],
            // An invalid file does not count toward the total.
            vec![file("/a", 0o444, &big), file("/proc/b", 0o444, &big)],
            vec![file("/a", 0o444, &big), file("/b", 0o1000, &big)],
            (0..=FILES_MAX)
                .map(|i| file(&format!("/f{i}"), 0o444, b""))
                .collect(),
            (0..FILES_MAX)
                .map(|i| file(&format!("/f{i}"), 0o444, b""))
                .collect(),
        ];
        for files in cases {
            let got = check_decoded_files(&files);
            assert_eq!(got, api_errors(&files), "{files:?}");
        }
        assert!(check_decoded_files(&[file("/proc/x", 0o444, b"")])
            .iter()
            .any(|e| e.field == "files[0].path"));
    }
}
