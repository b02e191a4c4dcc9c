//! What the agent reads from manifests, indexes and image configs. The documents themselves are
//! `oci_spec::image` types ([`ImageManifest`], [`ImageIndex`], [`ImageConfiguration`]); Docker
//! schema 2 manifests and manifest lists have the same JSON shape, and their media types come
//! through as `MediaType::Other`. Added here: which manifest kinds the agent asks for, the choice
//! of the host's platform in an index, the layer media types containerd can apply, and the layer
//! chain IDs and GC labels that name and keep unpacked images.

use std::collections::HashMap;

use oci_spec::image::{
    Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os,
};
use sha2::{Digest as _, Sha256};

/// The run defaults inside the image config (its `config` key: entrypoint, cmd, env, working
/// directory, user).
pub use oci_spec::image::Config as ImageRunConfig;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Docker's layer media types (oci-spec names only the OCI ones).
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
pub fn layer_compression(media_type: &MediaType) -> Option<LayerCompression> {
    match media_type {
        MediaType::ImageLayer => Some(LayerCompression::Uncompressed),
        MediaType::ImageLayerGzip => Some(LayerCompression::Gzip),
        MediaType::ImageLayerZstd => Some(LayerCompression::Zstd),
        MediaType::Other(other) if other == DOCKER_LAYER => Some(LayerCompression::Uncompressed),
        MediaType::Other(other) if other == DOCKER_LAYER_GZIP => Some(LayerCompression::Gzip),
        _ => None,
    }
}

/// Checks that every layer of `manifest` has a media type the agent can apply.
pub fn check_layer_media_types(manifest: &ImageManifest) -> Result<(), ManifestError> {
    match manifest
        .layers()
        .iter()
        .find(|layer| layer_compression(layer.media_type()).is_none())
    {
        Some(layer) => Err(ManifestError::UnsupportedLayerMediaType {
            digest: layer.digest().to_string(),
            media_type: layer.media_type().to_string(),
        }),
        None => Ok(()),
    }
}

/// Is this media type an index / manifest list?
pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// Reads the `mediaType` field of a manifest document; without one, a document listing
/// `manifests` is an (OCI) index and anything else an OCI manifest.
pub fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    let document: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let declared = document.get("mediaType").and_then(|t| t.as_str());
    Some(match declared {
        Some(media_type) => media_type.to_string(),
        None if document.get("manifests").is_some() => OCI_INDEX.to_string(),
        None => OCI_MANIFEST.to_string(),
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

pub fn parse_config(bytes: &[u8]) -> Result<ImageConfiguration, ManifestError> {
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

/// Picks the manifest for `os`/`architecture` out of an index, wherever it is listed.
pub fn select_platform<'a>(
    index: &'a ImageIndex,
    os: &str,
    architecture: &str,
) -> Result<&'a Descriptor, ManifestError> {
    let (want_os, want_arch) = (Os::from(os), Arch::from(architecture));
    index
        .manifests()
        .iter()
        .find(|m| {
            m.platform()
                .as_ref()
                .is_some_and(|p| p.os() == &want_os && p.architecture() == &want_arch)
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
        manifest.config().digest().to_string(),
    );
    for (i, layer) in manifest.layers().iter().enumerate() {
        labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            layer.digest().to_string(),
        );
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    const LZ4_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+lz4";

    /// A well-formed sha256 digest numbered `n` (oci-spec checks the form).
    fn digest(n: u32) -> String {
        format!("sha256:{n:064x}")
    }

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

    /// An index (OCI or a Docker manifest list) whose amd64 entry is not the first.
    fn index_document(media_type: &str, entry_type: &str) -> Vec<u8> {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {"mediaType": entry_type, "digest": digest(1), "size": 1,
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": entry_type, "digest": digest(2), "size": 1,
                 "platform": {"os": "linux", "architecture": "amd64"}},
            ],
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn selects_the_platform_from_an_oci_index_or_a_docker_manifest_list() {
        for (media_type, entry_type) in [
            (OCI_INDEX, OCI_MANIFEST),
            (DOCKER_MANIFEST_LIST, DOCKER_MANIFEST),
        ] {
            let doc = index_document(media_type, entry_type);
            assert_eq!(sniff_media_type(&doc).as_deref(), Some(media_type));
            assert!(is_index(media_type));
            let index = parse_index(&doc).expect("parses");
            let chosen = select_platform(&index, "linux", "amd64").expect("found");
            assert_eq!(chosen.digest().to_string(), digest(2), "{media_type}");
            assert_eq!(chosen.media_type().to_string(), entry_type);
            assert!(select_platform(&index, "linux", "s390x").is_err());
        }
    }

    #[test]
    fn a_document_without_media_type_is_sniffed_by_its_shape() {
        assert_eq!(
            sniff_media_type(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(
            sniff_media_type(br#"{"schemaVersion":2,"layers":[]}"#).as_deref(),
            Some(OCI_MANIFEST)
        );
        assert_eq!(sniff_media_type(b"not json"), None);
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
            (LZ4_LAYER, None),
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
            assert_eq!(
                layer_compression(&MediaType::from(media_type)),
                expected,
                "{media_type:?}"
            );
        }
    }

    fn manifest_with_layers(manifest_type: &str, layer_types: &[&str]) -> ImageManifest {
        let layers: Vec<_> = (0u32..)
            .zip(layer_types)
            .map(|(i, m)| serde_json::json!({"mediaType": m, "digest": digest(i), "size": 1}))
            .collect();
        let doc = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(99), "size": 1},
            "layers": layers,
        });
        parse_manifest(doc.to_string().as_bytes()).expect("parses")
    }

    #[test]
    fn mixed_supported_layers_pass_the_check() {
        let manifest =
            manifest_with_layers(OCI_MANIFEST, &[OCI_LAYER_ZSTD, OCI_LAYER_GZIP, OCI_LAYER]);
        assert!(check_layer_media_types(&manifest).is_ok());
        assert!(check_layer_media_types(&manifest_with_layers(OCI_MANIFEST, &[])).is_ok());
        let docker = manifest_with_layers(DOCKER_MANIFEST, &[DOCKER_LAYER_GZIP, DOCKER_LAYER]);
        assert!(check_layer_media_types(&docker).is_ok());
        let labels = manifest_gc_labels(&docker);
        assert_eq!(labels["containerd.io/gc.ref.content.config"], digest(99));
        assert_eq!(labels["containerd.io/gc.ref.content.l.1"], digest(1));
    }

    #[test]
    fn an_unsupported_layer_is_named_with_its_media_type() {
        let manifest = manifest_with_layers(OCI_MANIFEST, &[OCI_LAYER_ZSTD, LZ4_LAYER]);
        let error = check_layer_media_types(&manifest).expect_err("lz4 is not supported");
        assert!(
            matches!(&error, ManifestError::UnsupportedLayerMediaType { digest: d, media_type }
                if *d == digest(1) && media_type == LZ4_LAYER),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains(&format!("\"{LZ4_LAYER}\"")) && message.contains(&digest(1)),
            "{message}"
        );
    }

    #[test]
    fn parses_config_run_defaults() {
        let doc = br#"{"architecture":"amd64","os":"linux",
            "config":{"Env":["PATH=/bin"],"Entrypoint":["/ep"],"Cmd":["a"],"WorkingDir":"/w","User":"1000:1000"},
            "rootfs":{"type":"layers","diff_ids":["sha256:x"]}}"#;
        let cfg = parse_config(doc).expect("parses");
        let run = cfg.config().clone().expect("has config");
        assert_eq!(run.entrypoint(), &Some(vec!["/ep".to_string()]));
        assert_eq!(run.user().as_deref(), Some("1000:1000"));
        assert_eq!(cfg.rootfs().diff_ids(), &vec!["sha256:x".to_string()]);
    }
}
