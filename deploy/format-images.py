#!/usr/bin/env python3
"""Pushes test images in every format the node agent must pull, to a plain-HTTP registry.

Built from the registry's own busybox:latest (OCI, one gzip layer), using only the distribution
API and the standard library:

  formats/uncompressed:latest  OCI manifest, the busybox layer uncompressed (media type .tar)
  formats/docker-v2:latest     Docker v2 schema 2 manifest with Docker media types
  formats/layers:latest        three layers (gzip, gzip, plain tar): files, a whiteout and an
                               opaque directory; the container must see /data/keep, /data/new
                               and /data/dir/y only
  formats/index:latest         OCI image index: arm64 first, then amd64; /platform says which
  formats/docker-list:latest   Docker manifest list: the same, with Docker media types
  formats/zstd:latest          OCI, every layer zstd-compressed (by the `zstd` tool): busybox,
                               then files, a whiteout and an opaque directory like formats/layers;
                               the container must see /data/keep, /data/new and /data/dir/y only
  formats/lz4:latest           OCI, a layer with media type .tar+lz4, which the agent refuses
  formats/bad-diff-id:latest   OCI, a second layer whose config diff id is not its tar's digest
  users/named:latest           busybox with its own /etc/passwd and /etc/group (users app 1000
                               and svc 1001; app is also in groups extra 2000 and more 2001);
                               USER app
  users/group:latest           the same, USER app:svc
  users/ghost:latest           the same, USER ghost (not in its /etc/passwd)

Usage: format-images.py HOST:PORT   (idempotent: pushing the same content twice is harmless)
"""
import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_TGZ = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_TZST = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_TLZ4 = "application/vnd.oci.image.layer.v1.tar+lz4"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_TGZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    def __init__(self, addr):
        self.base = f"http://{addr}/v2"

    def get(self, path, accept=None):
        req = urllib.request.Request(self.base + path)
        if accept:
            req.add_header("Accept", accept)
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.read()

    def put_blob(self, repo, data):
        digest = sha(data)
        try:
            urllib.request.urlopen(
                urllib.request.Request(f"{self.base}/{repo}/blobs/{digest}", method="HEAD"), timeout=30
            )
            return digest
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
        start = urllib.request.Request(f"{self.base}/{repo}/blobs/uploads/", method="POST", data=b"")
        with urllib.request.urlopen(start, timeout=30) as res:
            location = res.headers["Location"]
        if location.startswith("/"):
            location = self.base[: -len("/v2")] + location
        sep = "&" if "?" in location else "?"
        put = urllib.request.Request(f"{location}{sep}digest={digest}", method="PUT", data=data)
        put.add_header("Content-Type", "application/octet-stream")
        urllib.request.urlopen(put, timeout=60).read()
        return digest

    def put_manifest(self, repo, ref, body, media_type):
        data = json.dumps(body, separators=(",", ":")).encode()
        req = urllib.request.Request(f"{self.base}/{repo}/manifests/{ref}", method="PUT", data=data)
        req.add_header("Content-Type", media_type)
        urllib.request.urlopen(req, timeout=30).read()
        return sha(data), len(data)


def tar_of(entries):
    """entries: list of (path, content or None for a directory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, content in entries:
            info = tarfile.TarInfo(path)
            info.mtime = 0
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = 0o644
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def gz(data):
    return gzip.compress(data, mtime=0)


def zst(data):
    """zstd-compresses with the command-line tool (the standard library has no zstd); the same
    input and level give the same bytes, so pushing again stays idempotent."""
    return subprocess.run(["zstd", "-q", "-c", "-3", "--no-progress"], input=data,
                          stdout=subprocess.PIPE, check=True).stdout


def main(addr):
    reg = Registry(addr)
    base = json.loads(reg.get("/busybox/manifests/latest", OCI_MANIFEST))
    config = json.loads(reg.get(f"/busybox/blobs/{base['config']['digest']}"))
    layer_gz = reg.get(f"/busybox/blobs/{base['layers'][0]['digest']}")
    layer_tar = gzip.decompress(layer_gz)
    base_diff = config["rootfs"]["diff_ids"][0]

    def image(repo, layers, arch="amd64", docker=False, diff_ids=None, user=None):
        """layers: list of (blob bytes, uncompressed tar bytes, media type). Pushes config and
        layers; returns the manifest body and its media type. `diff_ids` overrides the config's;
        `user` sets the config's User."""
        cfg = dict(config)
        if user is not None:
            cfg["config"] = dict(cfg.get("config") or {})
            cfg["config"]["User"] = user
        cfg["architecture"] = arch
        cfg["rootfs"] = {"type": "layers", "diff_ids": diff_ids or [sha(t) for _, t, _ in layers]}
        cfg_bytes = json.dumps(cfg, separators=(",", ":")).encode()
        cfg_digest = reg.put_blob(repo, cfg_bytes)
        descs = []
        for blob, _, media in layers:
            descs.append({"mediaType": media, "digest": reg.put_blob(repo, blob), "size": len(blob)})
        media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
        body = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG, "digest": cfg_digest, "size": len(cfg_bytes)},
            "layers": descs,
        }
        return body, media_type

    assert sha(layer_tar) == base_diff, "the base layer's diff id does not match"
    busybox_gz = (layer_gz, layer_tar, OCI_TGZ)

    body, media = image("formats/uncompressed", [(layer_tar, layer_tar, OCI_TAR)])
    reg.put_manifest("formats/uncompressed", "latest", body, media)

    body, media = image("formats/docker-v2", [(layer_gz, layer_tar, DOCKER_TGZ)], docker=True)
    reg.put_manifest("formats/docker-v2", "latest", body, media)

    second = tar_of([("data", None), ("data/keep", b"keep\n"), ("data/gone", b"gone\n"),
                     ("data/dir", None), ("data/dir/x", b"x\n")])
    third = tar_of([("data", None), ("data/.wh.gone", b""), ("data/new", b"new\n"),
                    ("data/dir", None), ("data/dir/.wh..wh..opq", b""), ("data/dir/y", b"y\n")])
    body, media = image("formats/layers", [busybox_gz, (gz(second), second, OCI_TGZ), (third, third, OCI_TAR)])
    reg.put_manifest("formats/layers", "latest", body, media)

    zfirst = tar_of([("data", None), ("data/keep", b"zstd-keep\n"), ("data/gone", b"gone\n"),
                     ("data/dir", None), ("data/dir/x", b"x\n")])
    zsecond = tar_of([("data", None), ("data/.wh.gone", b""), ("data/new", b"new\n"),
                      ("data/dir", None), ("data/dir/.wh..wh..opq", b""), ("data/dir/y", b"y\n")])
    zlayers = [(zst(t), t, OCI_TZST) for t in (layer_tar, zfirst, zsecond)]
    for blob, tar, _ in zlayers:
        assert blob[:4] == b"\x28\xb5\x2f\xfd", "zstd did not write a zstd frame"
        assert sha(tar) != sha(blob)
    body, media = image("formats/zstd", zlayers)
    reg.put_manifest("formats/zstd", "latest", body, media)

    body, media = image("formats/lz4", [busybox_gz, (zst(zfirst), zfirst, OCI_TLZ4)])
    reg.put_manifest("formats/lz4", "latest", body, media)

    marker = tar_of([("bad-diff-id", b"x\n")])
    body, media = image("formats/bad-diff-id", [busybox_gz, (gz(marker), marker, OCI_TGZ)],
                        diff_ids=[base_diff, sha(marker + b"not this")])
    reg.put_manifest("formats/bad-diff-id", "latest", body, media)

    accounts = tar_of([
        ("etc", None),
        ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                       b"app:x:1000:1000:App:/home/app:/bin/sh\n"
                       b"svc:x:1001:1001::/srv:/bin/sh\n"),
        ("etc/group", b"root:x:0:\napp:x:1000:\nsvc:x:1001:\nextra:x:2000:app\nmore:x:2001:svc,app\n"),
        ("home", None), ("home/app", None)])
    accounts_layer = (gz(accounts), accounts, OCI_TGZ)
    for repo, user in (("users/named", "app"), ("users/group", "app:svc"), ("users/ghost", "ghost")):
        body, media = image(repo, [busybox_gz, accounts_layer], user=user)
        reg.put_manifest(repo, "latest", body, media)

    for repo, docker in (("formats/index", False), ("formats/docker-list", True)):
        entries = []
        for arch in ("arm64", "amd64"):
            marker = tar_of([("platform", f"{arch}\n".encode())])
            layer_media = DOCKER_TGZ if docker else OCI_TGZ
            body, media = image(repo, [(layer_gz, layer_tar, layer_media), (gz(marker), marker, layer_media)], arch, docker)
            digest, size = reg.put_manifest(repo, f"{arch}-only", body, media)
            entries.append({"mediaType": media, "digest": digest, "size": size,
                            "platform": {"architecture": arch, "os": "linux"}})
        list_media = DOCKER_LIST if docker else OCI_INDEX
        reg.put_manifest(repo, "latest", {"schemaVersion": 2, "mediaType": list_media, "manifests": entries}, list_media)
    print(f"pushed formats/{{uncompressed,docker-v2,layers,zstd,lz4,bad-diff-id,index,docker-list}}:latest "
          f"and users/{{named,group,ghost}}:latest to {addr}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
