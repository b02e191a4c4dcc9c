//! A private registry's credentials: [`RegistryInput`] → [`RegistrySpec`].

use super::limits::*;
use super::names::is_host;
use super::{Collector, ValidationErrors};
use serde::Deserialize;

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
