#!/usr/bin/env bash
# Builds Berth's Debian packages (issue #17) with cargo-deb:
#   berth-scheduler   /usr/bin/berth-scheduler, its unit, /etc/berth/scheduler.toml
#   berth-api         /usr/bin/berth-api, its unit, /etc/berth/api.toml
#   berth-node-agent  /usr/bin/berth-node-agent, its unit (join writes its config)
#   berthctl          /usr/bin/berthctl
# What goes in each is `[package.metadata.deb]` of its crate's Cargo.toml; the units are in
# deploy/systemd/, the shipped configs in deploy/config/, the maintainer scripts in
# deploy/debian/. `deploy/check-packages.sh DIR` checks the result without installing it.
#
# Usage: deploy/package.sh [--out DIR] [--profile release|dev]
#   --out DIR      where the .deb files go (default: $CARGO_TARGET_DIR/debian, else target/debian)
#   --profile P    release (default), or dev: the debug build, stripped, for quick packaging in
#                  CI (cargo-deb maps its `target/release/` asset paths to the profile's
#                  directory, `target/debug/` for dev; not for production). cargo-deb 3.8 warns
#                  that the dev profile "will be a hard error in the future": it is pinned here,
#                  and a newer one may refuse --profile dev.
# Prints the path of each package built, one a line, on stdout.
#
# The four binaries are built by one cargo invocation (they share the workspace's crates), then
# `cargo deb --no-build` packs each. cargo-deb is installed if missing, pinned (it builds with
# the toolchain's rustc). Run it under `nice` on a shared machine: the build is the slow part.
set -euo pipefail

CARGO_DEB_VERSION=3.8.0
PACKAGES=(berth-scheduler berth-api berth-node-agent berthctl)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

usage() {
  sed -n '/^# Usage:/,/^# Prints/p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit "${1:-2}"
}

OUT=""
PROFILE=release
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || usage; OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --profile) [ $# -ge 2 ] || usage; PROFILE="$2"; shift 2 ;;
    --profile=*) PROFILE="${1#--profile=}"; shift ;;
    -h|--help) usage 0 ;;
    *) echo "package.sh: unknown argument: $1" >&2; usage ;;
  esac
done
case "$PROFILE" in
  release|dev) ;;
  *) echo "package.sh: --profile must be release or dev, not $PROFILE" >&2; exit 2 ;;
esac

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${OUT:-$TARGET_DIR/debian}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

log() { echo "package.sh: $*" >&2; }

# cargo-deb, pinned. An older or newer one may map assets or write scripts differently.
if ! cargo deb --version 2>/dev/null | grep -qx "cargo-deb $CARGO_DEB_VERSION"; then
  log "installing cargo-deb $CARGO_DEB_VERSION"
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked >&2
fi
# dpkg-shlibdeps computes the `$auto` shared-library dependencies.
if ! command -v dpkg-shlibdeps >/dev/null; then
  log "installing dpkg-dev (for dpkg-shlibdeps)"
  apt-get install -y -q dpkg-dev >&2 || { apt-get update -q >&2 && apt-get install -y -q dpkg-dev >&2; }
fi

BUILD=(cargo build --locked --profile "$PROFILE")
for p in "${PACKAGES[@]}"; do
  BUILD+=(-p "$p" --bin "$p")
done
log "building (${PROFILE}): ${BUILD[*]}"
started=$(date +%s)
"${BUILD[@]}" >&2
log "built in $(( $(date +%s) - started )) s"

# Packages of an older version would stay beside the new ones (and check-packages.sh wants one
# of each).
for p in "${PACKAGES[@]}"; do
  rm -f "$OUT/${p}"_*.deb
done
DEB=(cargo deb --no-build --locked --profile "$PROFILE" --output "$OUT")
# The debug binaries are large; light compression keeps the dev packaging quick.
[ "$PROFILE" = dev ] && DEB+=(--fast)
for p in "${PACKAGES[@]}"; do
  # cargo-deb prints the package's path last on stdout; warnings go to stderr.
  path="$("${DEB[@]}" -p "$p" | tail -n 1)"
  [ -f "$path" ] || { log "cargo deb -p $p made no package (got: $path)"; exit 1; }
  echo "$path"
done
