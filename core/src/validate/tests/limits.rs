//! The documented boundaries of each runner and run field; each error names its field.

use super::*;

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
