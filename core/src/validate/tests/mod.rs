//! Unit tests of the validation, by concern: runners and registries here, the documented
//! boundaries of each field in [`limits`], uploaded files and stop grace in [`files`].

use super::*;
use crate::model::{Catalog, EnvVar, RunnerSpec};

mod files;
mod limits;

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
fn a_run_input_lends_its_command_overrides() {
    use crate::command::CommandOverrides;
    let argv = vec!["echo".to_owned(), "x".to_owned()];
    let input = RunInput {
        argv: Some(argv.clone()),
        entrypoint: Some("/bin/env FOO=1".into()),
        ..Default::default()
    };
    assert_eq!(
        CommandOverrides::from(&input),
        CommandOverrides {
            command: None,
            argv: Some(&argv),
            entrypoint: Some("/bin/env FOO=1"),
        }
    );
}
