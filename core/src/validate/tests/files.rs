//! Uploaded files, batches and stop grace.

use super::*;
use crate::overrides::{check_batch, RunOverrides};
use base64::Engine as _;

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
    let fields: Vec<String> = check_batch(items, RunOverrides::from_input)
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
