//! Image references such as `127.0.0.1:5055/busybox:latest` or `alpine@sha256:…`, split into the
//! parts a registry request needs.

use std::fmt;

/// Docker Hub's API host; references without a registry host resolve here.
pub const DOCKER_HUB_HOST: &str = "registry-1.docker.io";

/// A reference that could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// image reference is empty
    #[error("image reference is empty")]
    Empty,
    /// the reference has an invalid repository path
    #[error("image reference {reference:?} has an invalid repository path")]
    InvalidRepository { reference: String },
    /// the reference has an invalid tag
    #[error("image reference {reference:?} has an invalid tag")]
    InvalidTag { reference: String },
    /// the reference has an invalid digest
    #[error("image reference {reference:?} has an invalid digest (want sha256:<64 hex>)")]
    InvalidDigest { reference: String },
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    /// Registry host with optional port, e.g. `127.0.0.1:5055` or `registry-1.docker.io`.
    pub registry: String,
    /// Repository path inside the registry, e.g. `library/alpine`.
    pub repository: String,
    /// Tag, if given (defaults to `latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// Digest, if given; it wins over the tag when fetching.
    pub digest: Option<String>,
}

impl ImageReference {
    /// Parses `[host[:port]/]path[:tag][@digest]` the way Docker does: the first path component
    /// is a host when it contains `.` or `:` or is `localhost`.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => {
                if !is_valid_digest(digest) {
                    return Err(ReferenceError::InvalidDigest {
                        reference: input.to_string(),
                    });
                }
                (rest, Some(digest.to_string()))
            }
            None => (input, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path)
            }
            _ => (DOCKER_HUB_HOST.to_string(), rest),
        };
        // A tag is the part after the last ':' of the last path component.
        let last_slash = path.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (repository, tag) = match path[last_slash..].rfind(':') {
            Some(i) => {
                let split = last_slash + i;
                (&path[..split], Some(path[split + 1..].to_string()))
            }
            None => (path, None),
        };
        if let Some(tag) = &tag {
            let ok = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-');
            if !ok {
                return Err(ReferenceError::InvalidTag {
                    reference: input.to_string(),
                });
            }
        }
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
            });
        if !repo_ok {
            return Err(ReferenceError::InvalidRepository {
                reference: input.to_string(),
            });
        }
        let repository = if registry == DOCKER_HUB_HOST && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_string()
        };
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to put after `/manifests/`: the digest if pinned, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The host name without port, used to decide on plain HTTP for loopback registries.
    pub fn host_without_port(&self) -> &str {
        host_without_port(&self.registry)
    }
}

/// Strips `:port` from `host:port`, keeping bracketed IPv6 hosts intact.
pub fn host_without_port(registry: &str) -> &str {
    if registry.starts_with('[') {
        return match registry.find(']') {
            Some(end) => &registry[..=end],
            None => registry,
        };
    }
    registry.split(':').next().unwrap_or(registry)
}

/// True for `sha256:` followed by 64 lowercase hex characters.
pub fn is_valid_digest(digest: &str) -> bool {
    match digest.strip_prefix("sha256:") {
        Some(hex) => {
            hex.len() == 64
                && hex
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        }
        None => false,
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn local_registry_with_port_and_tag() {
        let r = ImageReference::parse("127.0.0.1:5055/busybox:latest").expect("parses");
        assert_eq!(r.registry, "127.0.0.1:5055");
        assert_eq!(r.repository, "busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.digest, None);
        assert_eq!(r.host_without_port(), "127.0.0.1");
    }

    #[test]
    fn docker_hub_short_names_get_library_prefix_and_latest() {
        let r = ImageReference::parse("alpine").expect("parses");
        assert_eq!(r.registry, DOCKER_HUB_HOST);
        assert_eq!(r.repository, "library/alpine");
        assert_eq!(r.manifest_reference(), "latest");
        let r = ImageReference::parse("grafana/loki:2.9").expect("parses");
        assert_eq!(r.repository, "grafana/loki");
        assert_eq!(r.tag.as_deref(), Some("2.9"));
    }

    #[test]
    fn digest_wins_over_tag() {
        let r = ImageReference::parse(&format!("ghcr.io/a/b/c:v1@{D}")).expect("parses");
        assert_eq!(r.registry, "ghcr.io");
        assert_eq!(r.repository, "a/b/c");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.manifest_reference(), D);
        let r = ImageReference::parse(&format!("localhost/x@{D}")).expect("parses");
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.tag, None);
    }

    #[test]
    fn port_is_not_a_tag() {
        let r = ImageReference::parse("localhost:5000/team/app").expect("parses");
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(host_without_port("[::1]:5000"), "[::1]");
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(ImageReference::parse(""), Err(ReferenceError::Empty));
        assert!(matches!(
            ImageReference::parse("Upper/Case"),
            Err(ReferenceError::InvalidRepository { .. })
        ));
        assert!(matches!(
            ImageReference::parse("a@sha256:xyz"),
            Err(ReferenceError::InvalidDigest { .. })
        ));
        assert!(matches!(
            ImageReference::parse("a:b c"),
            Err(ReferenceError::InvalidTag { .. })
        ));
        assert!(matches!(
            ImageReference::parse("host.io//x"),
            Err(ReferenceError::InvalidRepository { .. })
        ));
    }
}
