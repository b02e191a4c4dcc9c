//! Builds distinct test images in the test registry: the registry's busybox layer (so runs have
//! a shell) plus one layer holding a file of random bytes, pushed with the distribution API.
//! Also a throttling TCP proxy (to make pulls slow enough to watch) and helpers that look into
//! the node's containerd namespace.

#![allow(dead_code)]

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What was pushed.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// Repository in the registry, e.g. `gc-a-1234`.
    pub repo: String,
    pub manifest_digest: String,
    pub config_digest: String,
    /// busybox's layer first, then the random one.
    pub layer_digests: Vec<String>,
    /// Config plus layer sizes, as the manifest gives them.
    pub blob_bytes: u64,
    /// Chain IDs of the layers, the last one the image's top snapshot.
    pub chain_ids: Vec<String>,
}

/// Random bytes (xorshift; incompressible enough for a size test), different per call.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ (u64::from(std::process::id()) << 32)
        | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An uncompressed tar holding one regular file.
fn tar_with_file(name: &str, data: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |field: &mut [u8], value: u64| {
        let digits = field.len() - 1;
        let s = format!("{value:0digits$o}");
        field[..digits].copy_from_slice(s.as_bytes());
    };
    octal(&mut header[100..108], 0o644);
    octal(&mut header[108..116], 0);
    octal(&mut header[116..124], 0);
    octal(&mut header[124..136], data.len() as u64);
    octal(&mut header[136..148], 0);
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u64 = header.iter().map(|b| u64::from(*b)).sum();
    let s = format!("{sum:06o}\0 ");
    header[148..156].copy_from_slice(s.as_bytes());
    let mut out = header.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(parent) => sha256(format!("{parent} {diff}").as_bytes()),
        };
        out.push(next);
    }
    out
}

async fn blob_exists(
    http: &reqwest::Client,
    registry: &str,
    repo: &str,
    digest: &str,
) -> Result<bool> {
    let res = http
        .head(format!("http://{registry}/v2/{repo}/blobs/{digest}"))
        .send()
        .await?;
    Ok(res.status().is_success())
}

async fn push_blob(
    http: &reqwest::Client,
    registry: &str,
    repo: &str,
    data: Vec<u8>,
) -> Result<String> {
    let digest = sha256(&data);
    if blob_exists(http, registry, repo, &digest).await? {
        return Ok(digest);
    }
    let start = http
        .post(format!("http://{registry}/v2/{repo}/blobs/uploads/"))
        .send()
        .await?;
    ensure!(
        start.status().as_u16() == 202,
        "upload start: {}",
        start.status()
    );
    let location = start
        .headers()
        .get("location")
        .and_then(|l| l.to_str().ok())
        .context("upload without Location")?
        .to_owned();
    let location = if location.starts_with('/') {
        format!("http://{registry}{location}")
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let put = http
        .put(format!("{location}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(data)
        .send()
        .await?;
    ensure!(
        put.status().as_u16() == 201,
        "blob upload: {}",
        put.status()
    );
    Ok(digest)
}

/// Pushes `repo:latest`: busybox's layer plus a layer with `random_len` random bytes.
pub async fn push_image(registry: &str, repo: &str, random_len: usize) -> Result<BuiltImage> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let base: Value = http
        .get(format!("http://{registry}/v2/busybox/manifests/latest"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await?
        .json()
        .await?;
    let base_layer = base["layers"][0].clone();
    let base_digest = base_layer["digest"]
        .as_str()
        .context("busybox layer")?
        .to_owned();
    let base_config_digest = base["config"]["digest"]
        .as_str()
        .context("busybox config")?;
    let mut config: Value = http
        .get(format!(
            "http://{registry}/v2/busybox/blobs/{base_config_digest}"
        ))
        .send()
        .await?
        .json()
        .await?;
    // The busybox layer, copied into the new repository.
    if !blob_exists(&http, registry, repo, &base_digest).await? {
        let bytes = http
            .get(format!("http://{registry}/v2/busybox/blobs/{base_digest}"))
            .send()
            .await?
            .bytes()
            .await?
            .to_vec();
        push_blob(&http, registry, repo, bytes).await?;
    }
    let layer = tar_with_file("random.bin", &random_bytes(random_len));
    let layer_size = layer.len() as u64;
    let layer_digest = push_blob(&http, registry, repo, layer).await?;
    let mut diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .context("busybox diff_ids")?
        .iter()
        .filter_map(|d| d.as_str().map(str::to_owned))
        .collect();
    diff_ids.push(layer_digest.clone());
    config["rootfs"]["diff_ids"] = json!(diff_ids);
    let config_bytes = serde_json::to_vec(&config)?;
    let config_size = config_bytes.len() as u64;
    let config_digest = push_blob(&http, registry, repo, config_bytes).await?;
    let base_size = base_layer["size"].as_u64().context("busybox layer size")?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [
            base_layer,
            {"mediaType": OCI_TAR, "digest": layer_digest, "size": layer_size},
        ],
    });
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = sha256(&manifest_bytes);
    let put = http
        .put(format!("http://{registry}/v2/{repo}/manifests/latest"))
        .header("content-type", OCI_MANIFEST)
        .body(manifest_bytes)
        .send()
        .await?;
    if !put.status().is_success() {
        bail!(
            "manifest upload: {} {}",
            put.status(),
            put.text().await.unwrap_or_default()
        );
    }
    Ok(BuiltImage {
        repo: repo.to_owned(),
        manifest_digest,
        config_digest,
        layer_digests: vec![base_digest, layer_digest],
        blob_bytes: config_size + base_size + layer_size,
        chain_ids: chain_ids(&diff_ids),
    })
}

/// A TCP proxy on 127.0.0.1 to `upstream` that passes answers at most `bytes_per_second`
/// (requests go through unthrottled). Returns its `host:port`; it runs until the test ends.
pub async fn throttling_proxy(upstream: &str, bytes_per_second: u64) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let upstream = upstream.to_owned();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    let _ = server_write.shutdown().await;
                });
                let started = tokio::time::Instant::now();
                let mut sent: u64 = 0;
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n as u64;
                    let due =
                        started + Duration::from_secs_f64(sent as f64 / bytes_per_second as f64);
                    tokio::time::sleep_until(due).await;
                }
                let _ = client_write.shutdown().await;
                up.abort();
            });
        }
    });
    Ok(addr)
}

/// Looks into a node's containerd namespace.
pub struct Containerd {
    channel: tonic::transport::Channel,
    namespace: String,
}

impl Containerd {
    pub async fn connect(socket: &str, node_id: &str) -> Result<Containerd> {
        Ok(Containerd {
            channel: containerd_client::connect(socket).await?,
            namespace: format!("berth-{node_id}"),
        })
    }

    fn request<T>(&self, message: T) -> Result<tonic::Request<T>> {
        let mut req = tonic::Request::new(message);
        req.metadata_mut()
            .insert("containerd-namespace", self.namespace.parse()?);
        Ok(req)
    }

    pub async fn has_image(&self, name: &str) -> Result<bool> {
        use containerd_client::services::v1::{images_client::ImagesClient, GetImageRequest};
        let got = ImagesClient::new(self.channel.clone())
            .get(self.request(GetImageRequest {
                name: name.to_owned(),
            })?)
            .await;
        exists(got)
    }

    pub async fn has_content(&self, digest: &str) -> Result<bool> {
        use containerd_client::services::v1::{content_client::ContentClient, InfoRequest};
        let got = ContentClient::new(self.channel.clone())
            .info(self.request(InfoRequest {
                digest: digest.to_owned(),
            })?)
            .await;
        exists(got)
    }

    pub async fn has_snapshot(&self, key: &str) -> Result<bool> {
        use containerd_client::services::v1::snapshots::{
            snapshots_client::SnapshotsClient, StatSnapshotRequest,
        };
        let got = SnapshotsClient::new(self.channel.clone())
            .stat(self.request(StatSnapshotRequest {
                snapshotter: "overlayfs".to_owned(),
                key: key.to_owned(),
            })?)
            .await;
        exists(got)
    }

    /// Whether the image record and the pieces only it has (its config, random layer, manifest
    /// and top snapshot) are all present (`true`) or all gone (`false`); an error if mixed.
    pub async fn image_state(&self, name: &str, image: &BuiltImage) -> Result<bool> {
        let mut present = vec![
            ("image", self.has_image(name).await?),
            ("manifest", self.has_content(&image.manifest_digest).await?),
            ("config", self.has_content(&image.config_digest).await?),
            ("layer", self.has_content(&image.layer_digests[1]).await?),
        ];
        if let Some(top) = image.chain_ids.last() {
            present.push(("top snapshot", self.has_snapshot(top).await?));
        }
        let all = present.iter().all(|(_, p)| *p);
        let none = present.iter().all(|(_, p)| !*p);
        ensure!(all || none, "{name} is half there: {present:?}");
        Ok(all)
    }
}

/// Whether a containerd lookup found its object (NOT_FOUND: no; any other error: an error).
fn exists<T>(got: std::result::Result<T, tonic::Status>) -> Result<bool> {
    match got {
        Ok(_) => Ok(true),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
        Err(s) => Err(s.into()),
    }
}
