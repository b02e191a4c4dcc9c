//! END-TO-END image pulls into a real containerd from real registries (tier 3). Needs:
//! - `BERTH_CONTAINERD_SOCKET`: a containerd 1.6 gRPC socket;
//! - `BERTH_TEST_REGISTRY`: `host:port` of a plain-HTTP registry holding `busybox:latest` and the
//!   `formats/*` images (OCI index and Docker manifest list with amd64 not first, Docker v2,
//!   several layers, uncompressed and zstd layers, an lz4 layer, a layer that is not its diff ID);
//! - `BERTH_TEST_PRIVATE_REGISTRY`, `BERTH_TEST_PRIVATE_USER`, `BERTH_TEST_PRIVATE_PASSWORD`: a
//!   plain-HTTP registry behind htpasswd (basic auth) holding `private/busybox:latest`.
//!
//! It FAILS when they are missing, on purpose: a silently skipped end-to-end test proves nothing.
//! Each test pulls into its own containerd namespace, emptied first, so every pull is cold.

use std::time::Duration;

use berth_node_agent::image::progress::PullProgressState;
use berth_node_agent::image::pull::{PullError, Puller};
use berth_node_agent::image::registry::{RegistryClient, RegistryError};
use berth_proto::v1::RegistryAuth;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{DeleteImageRequest, ListImagesRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic::Request;

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: this end-to-end test needs a real containerd and registries")
    })
}

fn ns<T>(namespace: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "containerd-namespace",
        namespace.parse().expect("namespace header"),
    );
    request
}

/// A puller on an emptied namespace (images deleted synchronously, so containerd's GC takes
/// their content and snapshots with them).
async fn fresh_puller(namespace: &str) -> Puller {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("berth_node_agent=debug")
        .try_init();
    let channel: Channel = containerd_client::connect(required_env("BERTH_CONTAINERD_SOCKET"))
        .await
        .expect("containerd");
    let mut images = ImagesClient::new(channel.clone());
    let listed = images
        .list(ns(namespace, ListImagesRequest { filters: vec![] }))
        .await
        .expect("list images")
        .into_inner()
        .images;
    for image in listed {
        images
            .delete(ns(
                namespace,
                DeleteImageRequest {
                    name: image.name,
                    sync: true,
                    ..Default::default()
                },
            ))
            .await
            .expect("delete image");
    }
    Puller::new(channel, namespace.to_string(), RegistryClient::new(vec![]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_every_supported_format_and_refuses_the_others_by_name() {
    let registry = required_env("BERTH_TEST_REGISTRY");
    let puller = fresh_puller("berth-e2e-pull-formats").await;

    for repo in [
        "busybox",
        "formats/index",
        "formats/docker-list",
        "formats/docker-v2",
        "formats/layers",
        "formats/uncompressed",
        "formats/zstd",
    ] {
        let image = format!("{registry}/{repo}:latest");
        let progress = puller.watch_progress(&image);
        let prepared = puller
            .pull(&image, None)
            .await
            .unwrap_or_else(|e| panic!("{image}: {e}"));
        assert!(prepared.digest.starts_with("sha256:"), "{prepared:?}");
        assert!(prepared.top_chain_id.starts_with("sha256:"), "{prepared:?}");
        let state = *progress.borrow();
        assert!(
            state.complete
                && state.bytes_done == state.bytes_total
                && state.bytes_total > 0
                && state.layers_done == state.layers_total,
            "{image}: {state:?}"
        );

        // The same image pinned by its digest resolves to the same thing.
        let pinned = format!("{registry}/{repo}@{}", prepared.digest);
        let again = puller
            .pull(&pinned, None)
            .await
            .unwrap_or_else(|e| panic!("{pinned}: {e}"));
        assert_eq!(again, prepared, "{pinned}");
    }

    let lz4 = format!("{registry}/formats/lz4:latest");
    let error = puller.pull(&lz4, None).await.expect_err("lz4 is refused");
    let message = error.to_string();
    assert!(
        message.contains("unsupported media type")
            && message.contains("application/vnd.oci.image.layer.v1.tar+lz4"),
        "{message}"
    );

    let bad = format!("{registry}/formats/bad-diff-id:latest");
    let message = puller
        .pull(&bad, None)
        .await
        .expect_err("a layer that is not its diff id is refused")
        .to_string();
    assert!(
        message.contains("unpacks to") && message.contains("but the image config says"),
        "{message}"
    );

    let missing = format!("{registry}/does-not-exist:latest");
    assert!(puller.pull(&missing, None).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_registry_wants_the_right_password() {
    let host = required_env("BERTH_TEST_PRIVATE_REGISTRY");
    let auth = |password: &str| RegistryAuth {
        host: host.clone(),
        username: required_env("BERTH_TEST_PRIVATE_USER"),
        password: password.to_string(),
    };
    let image = format!("{host}/private/busybox:latest");
    let puller = fresh_puller("berth-e2e-pull-private").await;

    let error = puller
        .pull(&image, Some(&auth("not-the-password")))
        .await
        .expect_err("a wrong password is refused");
    assert!(
        matches!(
            error,
            PullError::Registry(RegistryError::Unauthorized { .. })
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("401"), "{message}");
    assert!(!message.contains("not-the-password"), "{message}");

    let error = puller
        .pull(&image, None)
        .await
        .expect_err("no credentials are refused");
    assert!(error.to_string().contains("401"), "{error}");

    let password = required_env("BERTH_TEST_PRIVATE_PASSWORD");
    let prepared = puller
        .pull(&image, Some(&auth(&password)))
        .await
        .unwrap_or_else(|e| panic!("{image}: {e}"));
    assert!(prepared.top_chain_id.starts_with("sha256:"));

    // Present now, but another wrong password must still not get it from the registry, and a
    // refusal never falls back to the local copy.
    let error = puller
        .pull(&image, Some(&auth("wrong-again")))
        .await
        .expect_err("the local copy does not excuse a wrong password");
    assert!(error.to_string().contains("401"), "{error}");
}

/// A TCP proxy to `upstream` that sends the answers on at about `bytes_per_second`.
async fn throttling_proxy(upstream: String, bytes_per_second: usize) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let chunk = bytes_per_second / 20;
                let mut buf = vec![0u8; chunk];
                loop {
                    match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if client_write.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pull_counts_its_bytes_as_they_arrive() {
    let registry = required_env("BERTH_TEST_REGISTRY");
    let proxy = throttling_proxy(registry, 1 << 20).await;
    let puller = fresh_puller("berth-e2e-pull-progress").await;
    let image = format!("{proxy}/busybox:latest");

    let mut progress = puller.watch_progress(&image);
    let watcher = tokio::spawn(async move {
        let mut seen: Vec<PullProgressState> = Vec::new();
        while progress.changed().await.is_ok() {
            let state = *progress.borrow_and_update();
            seen.push(state);
            if state.complete {
                break;
            }
        }
        seen
    });
    puller
        .pull(&image, None)
        .await
        .unwrap_or_else(|e| panic!("{image}: {e}"));
    let seen = tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("the pull completes its progress")
        .expect("watcher");
    assert!(
        seen.iter()
            .any(|s| s.bytes_done > 0 && s.bytes_done < s.bytes_total),
        "byte-level progress while the layer streams: {seen:?}"
    );
    let last = seen.last().copied().unwrap_or_default();
    assert!(
        last.complete && last.bytes_done == last.bytes_total,
        "{last:?}"
    );
}

/// A TCP proxy to `upstream` that counts the bytes clients send through it (requests).
async fn counting_proxy(
    upstream: String,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let sent = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match client_read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            counter.fetch_add(n, Ordering::SeqCst);
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_resolved_moments_ago_is_not_asked_again_for_the_same_credentials() {
    use std::sync::atomic::Ordering;
    let registry = required_env("BERTH_TEST_REGISTRY");
    let (proxy, sent) = counting_proxy(registry).await;
    let image = format!("{proxy}/busybox:latest");
    let puller = fresh_puller("berth-e2e-pull-resolve")
        .await
        .with_resolve_ttl(Duration::from_secs(60));
    let first = puller.pull(&image, None).await.expect("pull");
    let after_first = sent.load(Ordering::SeqCst);
    assert!(after_first > 0, "the first pull asks the registry");
    // Again within the window: the same image, and not a byte to the registry.
    let again = puller.pull(&image, None).await.expect("pull again");
    assert_eq!(again, first);
    assert_eq!(sent.load(Ordering::SeqCst), after_first, "no request");
    // Other credentials are never answered from what a pull without them found.
    let auth = RegistryAuth {
        host: proxy.clone(),
        username: "someone".into(),
        password: "else".into(),
    };
    let with_auth = puller
        .pull(&image, Some(&auth))
        .await
        .expect("pull with auth");
    assert_eq!(with_auth.digest, first.digest);
    let after_auth = sent.load(Ordering::SeqCst);
    assert!(
        after_auth > after_first,
        "other credentials ask the registry"
    );

    // Past half the window the answer says so; a re-check (one manifest request, off the
    // run's path) renews it, so a pull after the first window still asks nothing.
    let renewing = fresh_puller("berth-e2e-pull-resolve-renew")
        .await
        .with_resolve_ttl(Duration::from_millis(4_000));
    let (first, ageing) = renewing.pull_noting_age(&image, None).await.expect("pull");
    assert!(!ageing, "a fresh answer");
    // Past half the window, with 1.6 s to spare before its end (a loaded machine is slow).
    tokio::time::sleep(Duration::from_millis(2_400)).await;
    let before = sent.load(Ordering::SeqCst);
    let (again, ageing) = renewing.pull_noting_age(&image, None).await.expect("pull");
    assert_eq!(
        (again.digest.as_str(), ageing),
        (first.digest.as_str(), true)
    );
    assert_eq!(
        sent.load(Ordering::SeqCst),
        before,
        "answered from the cache"
    );
    let (_, ageing) = renewing.pull_noting_age(&image, None).await.expect("pull");
    assert!(!ageing, "one re-check at a time");
    renewing.refresh(&image, None).await;
    let after_refresh = sent.load(Ordering::SeqCst);
    assert!(after_refresh > before, "the re-check asks the registry");
    tokio::time::sleep(Duration::from_millis(2_400)).await;
    let renewed = renewing.pull(&image, None).await.expect("pull");
    assert_eq!(renewed.digest, first.digest);
    assert_eq!(
        sent.load(Ordering::SeqCst),
        after_refresh,
        "renewed: 4.8 s after the first pull (past its window), still no request"
    );

    // Without a window (the default), every pull asks.
    let every_time = fresh_puller("berth-e2e-pull-resolve-0").await;
    every_time.pull(&image, None).await.expect("pull");
    let before = sent.load(Ordering::SeqCst);
    every_time.pull(&image, None).await.expect("pull again");
    assert!(sent.load(Ordering::SeqCst) > before, "resolved again");
}
