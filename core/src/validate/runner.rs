//! A runner's spec: [`RunnerInput`] as a create (`into_spec`) or a patch (`apply`), and
//! [`validate_spec`] for specs that arrive complete.

use super::fields::{
    check_argv, check_command, check_entrypoint, check_env, check_max_concurrent_runs,
    check_stop_grace,
};
use super::limits::*;
use super::names::{is_image_name, is_image_tag};
use super::{Collector, ValidationErrors};
use crate::model::{Catalog, EnvVar, RunnerSpec};
use serde::Deserialize;

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
    /// The most runs of this runner holding a node at once (assigned or running), 1 to 10,000;
    /// later runs wait `pending`, their `pending_reason` naming the cap and their place behind
    /// it. Absent or `null` on create: no cap; `null` on PATCH removes the cap.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, nullable, minimum = 1, maximum = 10000)]
    pub max_concurrent_runs: Option<Option<i64>>,
    /// How failed runs are tried again (see `RetryPolicy`); a run may bring its own. Absent or
    /// `null` on create: never; `null` on PATCH removes it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<crate::retry::RetryPolicy>, nullable)]
    pub retry_policy: Option<Option<crate::retry::RetryPolicy>>,
    /// Receives a signed JSON event (`POST`, header `Berth-Signature: t=…,v1=…`, an HMAC-SHA256
    /// of `"<t>.<body>"` with `notify_secret`) when one of this runner's runs ends; retried with
    /// backoff for about 6 hours until a 2xx answer. An `http://` or `https://` URL, at most
    /// 2,048 characters. Needs `notify_secret` when first set; `null` on PATCH removes both.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, nullable, max_length = 2048)]
    pub notify_url: Option<Option<String>>,
    /// The secret that signs the events, 16 to 256 visible ASCII characters. Write-only: never
    /// shown (the runner shows `notify_secret_set`). Given alone on PATCH, it replaces the
    /// secret.
    #[schema(min_length = 16, max_length = 256)]
    pub notify_secret: Option<String>,
    /// How the runner's runs are isolated from the node's kernel: `container` (runc; the
    /// default) or `sandbox` (gVisor: a kernel in user space between the run and the host, for
    /// code you do not trust; placed only on nodes that have it). An instance type may force
    /// `sandbox` (`GET /v1/instance_types`); each run shows the isolation and runtime it got.
    pub isolation: Option<crate::model::Isolation>,
}

/// A field that may be given as `null` to clear it: `Some(None)` for `null`, `None` (by the
/// field's default) when absent.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Ok(Some(Option::<T>::deserialize(d)?))
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
            max_concurrent_runs: check_max_concurrent_runs(
                &mut c,
                self.max_concurrent_runs.flatten(),
            ),
            retry_policy: self.retry_policy.flatten(),
            notify: None,
            isolation: self.isolation.unwrap_or_default(),
        };
        let spec = RunnerSpec {
            notify: check_notify(&mut c, None, self.notify_url, self.notify_secret),
            ..spec
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
        if let Some(cap) = self.max_concurrent_runs {
            next.max_concurrent_runs = check_max_concurrent_runs(&mut c, cap);
        }
        if let Some(policy) = self.retry_policy {
            next.retry_policy = policy;
        }
        if let Some(isolation) = self.isolation {
            next.isolation = isolation;
        }
        next.notify = check_notify(
            &mut c,
            current.notify.as_ref(),
            self.notify_url,
            self.notify_secret,
        );
        check_spec(&mut c, &next, &[], catalog);
        c.finish(next)
    }
}

/// The notify settings after a create (`current` None) or a patch: `notify_url` `null` removes
/// them, a URL sets it (a secret is needed unless one is kept), a secret alone replaces the
/// secret. An empty secret in `current` is one the API could not see (it is never shown): the
/// scheduler keeps the stored one.
fn check_notify(
    c: &mut Collector,
    current: Option<&crate::webhook::Notify>,
    url: Option<Option<String>>,
    secret: Option<String>,
) -> Option<crate::webhook::Notify> {
    use crate::webhook::{check_secret, check_url, Notify};
    if let Some(s) = &secret {
        check_secret(c, "notify_secret", s);
    }
    match url {
        Some(None) => {
            if secret.is_some() {
                c.push("notify_secret", "cannot be set while notify_url is removed");
            }
            None
        }
        Some(Some(url)) => {
            check_url(c, "notify_url", &url);
            let secret = secret.or_else(|| current.map(|n| n.secret.clone()));
            match secret {
                Some(secret) => Some(Notify { url, secret }),
                None => {
                    c.push("notify_secret", "is required with notify_url");
                    None
                }
            }
        }
        None => match (current, secret) {
            (Some(n), Some(secret)) => Some(Notify {
                url: n.url.clone(),
                secret,
            }),
            (current, None) => current.cloned(),
            (None, Some(_)) => {
                c.push("notify_secret", "needs notify_url");
                None
            }
        },
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
    check_max_concurrent_runs(&mut c, spec.max_concurrent_runs.map(i64::from));
    if let Some(n) = &spec.notify {
        crate::webhook::check_url(&mut c, "notify_url", &n.url);
        // Empty: kept from the stored runner (see `check_notify`).
        if !n.secret.is_empty() {
            crate::webhook::check_secret(&mut c, "notify_secret", &n.secret);
        }
    }
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
    if let Some(policy) = &s.retry_policy {
        policy.check(c, "retry_policy");
    }
}
