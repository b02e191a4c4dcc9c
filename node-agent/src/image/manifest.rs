//! The parts of OCI / Docker v2 manifests, indexes and image configs the agent reads, plus the
//! layer chain-ID computation that names unpacked snapshots.

use std::collections::HashMap;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Every manifest kind the agent can pull, for the `Accept` header.
pub const ACCEPTED_MANIFEST_TYPES: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

/// A manifest or config that could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// the document is not valid JSON of the expected shape
    #[error("{what} is not valid: {source}")]
    Malformed {
        what: &'static str,
        source: serde_json::Error,
    },
    /// the index lists no manifest for the wanted platform
    #[error("image index has no manifest for {os}/{architecture}")]
    NoMatchingPlatform { os: String, architecture: String },
    /// the config's diff ids do not match the manifest's layers
    #[error("image config lists {diff_ids} diff ids but the manifest has {layers} layers")]
    LayerCountMismatch { diff_ids: usize, layers: usize },
    /// a layer's media type is not one containerd's Diff service can apply here
    #[error(
        "layer {digest} has unsupported media type \"{media_type}\" (supported: tar, tar+gzip \
         and tar+zstd, OCI or Docker)"
    )]
    UnsupportedLayerMediaType { digest: String, media_type: String },
}

/// How a layer blob is compressed, as its media type says. containerd's Diff service
/// decompresses it while applying; the agent only checks the type up front so an image it cannot
/// unpack fails before anything is downloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    Uncompressed,
    Gzip,
    Zstd,
}

impl LayerCompression {
    pub fn as_str(self) -> &'static str {
        match self {
            LayerCompression::Uncompressed => "none",
            LayerCompression::Gzip => "gzip",
            LayerCompression::Zstd => "zstd",
        }
    }
}

/// The compression of a layer with this media type, or None if the agent cannot apply it.
/// Foreign and non-distributable layers (blobs that live outside the registry) are not supported.
pub fn layer_compression(media_type: &str) -> Option<LayerCompression> {
    match media_type {
        OCI_LAYER | DOCKER_LAYER => Some(LayerCompression::Uncompressed),
        OCI_LAYER_GZIP | DOCKER_LAYER_GZIP => Some(LayerCompression::Gzip),
        OCI_LAYER_ZSTD => Some(LayerCompression::Zstd),
        _ => None,
    }
}

/// Checks that every layer of `manifest` has a media type the agent can apply.
pub fn check_layer_media_types(manifest: &ImageManifest) -> Result<(), ManifestError> {
    match manifest
        .layers
        .iter()
        .find(|layer| layer_compression(&layer.media_type).is_none())
    {
        Some(layer) => Err(ManifestError::UnsupportedLayerMediaType {
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
        }),
        None => Ok(()),
    }
}

/// A content descriptor (media type, digest, size).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// An image manifest (OCI or Docker schema 2; their JSON is the same shape).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// An image index / manifest list.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub manifests: Vec<Descriptor>,
}

/// The image config blob.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ImageConfigFile {
    #[serde(default)]
    pub config: Option<ImageRunConfig>,
    pub rootfs: RootFs,
}

/// The run defaults inside the image config (`config` key).
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ImageRunConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// Is this media type an index / manifest list?
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// Reads the `mediaType` field of a manifest document, if any.
pub fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes).ok()?;
    probe.media_type.or_else(|| {
        probe
            .manifests
            .map(|_| OCI_INDEX.to_string())
            .or(Some(OCI_MANIFEST.to_string()))
    })
}

pub fn parse_manifest(bytes: &[u8]) -> Result<ImageManifest, ManifestError> {
    serde_json::from_slice(bytes).map_err(|source| ManifestError::Malformed {
        what: "image manifest",
        source,
    })
}

pub fn parse_index(bytes: &[u8]) -> Result<ImageIndex, ManifestError> {
    serde_json::from_slice(bytes).map_err(|source| ManifestError::Malformed {
        what: "image index",
        source,
    })
}

pub fn parse_config(bytes: &[u8]) -> Result<ImageConfigFile, ManifestError> {
    serde_json::from_slice(bytes).map_err(|source| ManifestError::Malformed {
        what: "image config",
        source,
    })
}

/// The platform this agent runs containers for, in OCI spelling.
pub fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ("linux", arch)
}

/// Picks the manifest for `os`/`architecture` out of an index.
pub fn select_platform<'a>(
    index: &'a ImageIndex,
    os: &str,
    architecture: &str,
) -> Result<&'a Descriptor, ManifestError> {
    index
        .manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == architecture)
        })
        .ok_or_else(|| ManifestError::NoMatchingPlatform {
            os: os.to_string(),
            architecture: architecture.to_string(),
        })
}

/// sha256 digest of `bytes` in `sha256:<hex>` form.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Chain IDs for a list of layer diff IDs: `chain[0] = diff[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff[i])`. Unpacked snapshots are named by these, so
/// images sharing a layer prefix share snapshots.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(parent) => sha256_digest(format!("{parent} {diff}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// The GC labels containerd needs on a manifest so its config and layers stay alive.
pub fn manifest_gc_labels(manifest: &ImageManifest) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    labels.insert(
        "containerd.io/gc.ref.content.config".to_string(),
        manifest.config.digest.clone(),
    );
    for (i, layer) in manifest.layers.iter().enumerate() {
        labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            layer.digest.clone(),
        );
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_id_of_one_layer_is_its_diff_id() {
        let d = "sha256:aaaa".to_string();
        assert_eq!(chain_ids(std::slice::from_ref(&d)), vec![d]);
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn chain_id_follows_the_oci_formula() {
        let a = "sha256:a".to_string();
        let b = "sha256:b".to_string();
        let c = "sha256:c".to_string();
        let ids = chain_ids(&[a.clone(), b.clone(), c.clone()]);
        let ab = sha256_digest(format!("{a} {b}").as_bytes());
        let abc = sha256_digest(format!("{ab} {c}").as_bytes());
        assert_eq!(ids, vec![a, ab, abc]);
    }

    #[test]
    fn known_chain_id_vector() {
        // sha256("sha256:1 sha256:2"), computed independently with sha256sum.
        let ids = chain_ids(&["sha256:1".to_string(), "sha256:2".to_string()]);
        assert_eq!(
            ids[1],
            sha256_digest(b"sha256:1 sha256:2"),
            "second chain id hashes parent, space, diff"
        );
    }

    #[test]
    fn selects_platform_from_index() {
        let doc = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",
            "manifests":[
              {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:arm","size":1,
               "platform":{"os":"linux","architecture":"arm64"}},
              {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:amd","size":1,
               "platform":{"os":"linux","architecture":"amd64"}}]}"#;
        assert_eq!(sniff_media_type(doc).as_deref(), Some(OCI_INDEX));
        let index = parse_index(doc).expect("parses");
        assert_eq!(
            select_platform(&index, "linux", "amd64")
                .expect("found")
                .digest,
            "sha256:amd"
        );
        assert!(select_platform(&index, "linux", "s390x").is_err());
    }

    #[test]
    fn layer_media_types_map_to_their_compression() {
        use LayerCompression::*;
        for (media_type, expected) in [
            (OCI_LAYER, Some(Uncompressed)),
            (OCI_LAYER_GZIP, Some(Gzip)),
            (OCI_LAYER_ZSTD, Some(Zstd)),
            (DOCKER_LAYER, Some(Uncompressed)),
            (DOCKER_LAYER_GZIP, Some(Gzip)),
            ("application/vnd.oci.image.layer.v1.tar+lz4", None),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                None,
            ),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                None,
            ),
            ("", None),
        ] {
            assert_eq!(layer_compression(media_type), expected, "{media_type:?}");
        }
    }

    fn manifest_with_layers(media_types: &[&str]) -> ImageManifest {
        let layers: Vec<_> = media_types
            .iter()
            .enumerate()
            .map(|(i, m)| serde_json::json!({"mediaType": m, "digest": format!("sha256:{i}"), "size": 1}))
            .collect();
        let doc = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:c", "size": 1},
            "layers": layers,
        });
        parse_manifest(doc.to_string().as_bytes()).expect("parses")
    }

    #[test]
    fn mixed_supported_layers_pass_the_check() {
        let manifest = manifest_with_layers(&[OCI_LAYER_ZSTD, OCI_LAYER_GZIP, OCI_LAYER]);
        assert!(check_layer_media_types(&manifest).is_ok());
        assert!(check_layer_media_types(&manifest_with_layers(&[])).is_ok());
    }

    #[test]
    fn an_unsupported_layer_is_named_with_its_media_type() {
        let manifest =
            manifest_with_layers(&[OCI_LAYER_ZSTD, "application/vnd.oci.image.layer.v1.tar+lz4"]);
        let error = check_layer_media_types(&manifest).expect_err("lz4 is not supported");
        assert!(
            matches!(&error, ManifestError::UnsupportedLayerMediaType { digest, media_type }
                if digest == "sha256:1" && media_type == "application/vnd.oci.image.layer.v1.tar+lz4"),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains("\"application/vnd.oci.image.layer.v1.tar+lz4\"")
                && message.contains("sha256:1"),
            "{message}"
        );
    }

    #[test]
    fn parses_config_run_defaults() {
        let doc = br#"{"architecture":"amd64","os":"linux",
            "config":{"Env":["PATH=/bin"],"Entrypoint":["/ep"],"Cmd":["a"],"WorkingDir":"/w","User":"1000:1000"},
            "rootfs":{"type":"layers","diff_ids":["sha256:x"]}}"#;
        let cfg = parse_config(doc).expect("parses");
        let run = cfg.config.expect("has config");
        assert_eq!(run.entrypoint, Some(vec!["/ep".to_string()]));
        assert_eq!(run.user.as_deref(), Some("1000:1000"));
        assert_eq!(cfg.rootfs.diff_ids, vec!["sha256:x".to_string()]);
    }
}
