#!/usr/bin/env bash
# Run the whole Berth test suite against a private containerd + registry.
#
#   deploy/test.sh [--lint] [CARGO TEST ARGS...]
#   e.g. deploy/test.sh -p berth-node-agent pull -- --nocapture
#
#   --lint   first run `cargo fmt --all --check` and
#            `cargo clippy --workspace --all-targets -- -D warnings`
#            (a lint failure fails the run, but the tests still run so one
#            run reports everything)
#
# Starts containerd (data under BERTH_TEST_DATA_DIR, default
# /var/lib/berth/test — separate from the fleet of deploy/up.sh), a registry
# on 127.0.0.1:5001 holding busybox:latest, builds the debug binaries, then runs
# `cargo test --workspace ARGS...` with
#   BERTH_CONTAINERD_SOCKET  the test containerd's socket
#   BERTH_TEST_REGISTRY      127.0.0.1:5001
#   BERTH_BIN_DIR            <target>/debug (berth-scheduler, berth-api, berth-node-agent)
#   BERTH_TEST_PACKAGES      the Debian packages of that build (deploy/package.sh --profile dev,
#                            checked by deploy/check-packages.sh)
# then (for a full run) the run-path suites again with BERTH_TEST_ISOLATION=sandbox (gVisor),
# then deploy/schemathesis.sh: schemathesis against a live fleet's
# /v1/openapi.json. containerd and the registry are stopped at the end unless
# BERTH_KEEP_INFRA=1. The exit status is cargo test's, else schemathesis's, else 1 if the
# package checks or only the lint failed.
set -euo pipefail

# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

LINT=0
if [[ "${1:-}" == --lint ]]; then
  LINT=1
  shift
fi

DATA_DIR="${BERTH_TEST_DATA_DIR:-/var/lib/berth/test}"
REGISTRY_ADDR="${BERTH_TEST_REGISTRY_ADDR:-127.0.0.1:5001}"
mkdir -p "$DATA_DIR/logs"
TEST_LOG="$DATA_DIR/logs/cargo-test.log"
START=$SECONDS

declare -A RESULT=()
STEPS=()
record() { # STEP RESULT
  STEPS+=("$1")
  RESULT[$1]="$2"
}

summary() {
  local s
  echo
  echo "================================================================ summary"
  for s in "${STEPS[@]}"; do
    printf '  %-8s %s\n' "$s" "${RESULT[$s]}"
  done
  if [[ -n "${FAILED_NAMES:-}" ]]; then
    while read -r name; do
      printf '    failed: %s\n' "$name"
    done <<<"$FAILED_NAMES"
  fi
  printf '  time     %ss\n' "$((SECONDS - START))"
  printf '  logs     %s/logs (containerd.log, registry.log, cargo-test.log, schemathesis.log, artifacts/screenshots)\n' "$DATA_DIR"
  echo "================================================================"
}

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  if [[ "${BERTH_KEEP_INFRA:-0}" == 1 ]]; then
    berth_log "leaving the test containerd and registry running (BERTH_KEEP_INFRA=1); stop with: deploy/down.sh --all"
  else
    berth_stop_containerd "$DATA_DIR" || true
    berth_stop_registry "$DATA_DIR" || true
    berth_stop_registry "$DATA_DIR" private-registry || true
  fi
  exit "$rc"
}

# The browser tests (tests/tests/dashboard.rs) drive Debian's Chromium with Selenium.
BERTH_PACKAGES+=(chromium chromium-driver python3-selenium)
berth_install_packages
cd "$BERTH_REPO"

# ---------------------------------------------------------------- lint
LINT_FAILED=0
if ((LINT)); then
  berth_log "cargo fmt --all --check"
  if cargo fmt --all --check -- --color never; then
    record fmt ok
  else
    record fmt FAILED
    LINT_FAILED=1
  fi
  berth_log "cargo clippy --workspace --all-targets -- -D warnings"
  if cargo clippy --workspace --all-targets -- -D warnings; then
    record clippy ok
  else
    record clippy FAILED
    LINT_FAILED=1
  fi
fi

# ---------------------------------------------------------------- build
berth_log "cargo build --workspace --bins (target dir $(berth_target_dir))"
if ! cargo build --workspace --bins; then
  record build FAILED
  summary
  exit 1
fi
record build ok

# ---------------------------------------------------------------- packages
# The Debian packages (issue #17) from the debug build just made (`deploy/package.sh --profile
# dev`: the same files, units and maintainer scripts as a release build, without another
# build), checked without installing them (deploy/check-packages.sh: contents, modes,
# dependencies, the shipped configs read by their daemons, `systemd-analyze verify` of the
# units). tests/tests/packages.rs then runs a fleet from them (BERTH_TEST_PACKAGES).
PKG_RC=0
PKG_DIR="$DATA_DIR/packages"
PKG_LOG="$DATA_DIR/logs/packages.log"
rm -rf "$PKG_DIR"
berth_log "deploy/package.sh --profile dev, deploy/check-packages.sh (log: $PKG_LOG)"
if bash "$BERTH_REPO/deploy/package.sh" --profile dev --out "$PKG_DIR" >"$PKG_LOG" 2>&1 &&
  bash "$BERTH_REPO/deploy/check-packages.sh" "$PKG_DIR" >>"$PKG_LOG" 2>&1; then
  record packages "ok: $(grep -Eo '[0-9]+ passed, [0-9]+ failed' "$PKG_LOG" | tail -n1)"
else
  PKG_RC=1
  cat "$PKG_LOG"
  record packages "FAILED: see $PKG_LOG"
fi
export BERTH_TEST_PACKAGES="$PKG_DIR"

# ---------------------------------------------------------------- services
trap cleanup EXIT
berth_start_containerd "$DATA_DIR" >/dev/null
# Once containerd has taken down what earlier test runs left running.
berth_sweep_test_networks
berth_start_registry "$DATA_DIR" "$REGISTRY_ADDR"
berth_build_busybox_image "$REGISTRY_ADDR"
python3 "$BERTH_REPO/deploy/format-images.py" "$REGISTRY_ADDR"
PRIVATE_REGISTRY_ADDR="${BERTH_TEST_PRIVATE_REGISTRY_ADDR:-127.0.0.1:5002}"
PRIVATE_USER=berth-test
# A loopback-only test registry: a fixed password keeps a reused registry consistent.
PRIVATE_PASSWORD=berth-test-password
berth_start_private_registry "$DATA_DIR" "$PRIVATE_REGISTRY_ADDR" "$PRIVATE_USER" "$PRIVATE_PASSWORD" "$REGISTRY_ADDR"
export BERTH_TEST_PRIVATE_REGISTRY="$PRIVATE_REGISTRY_ADDR" BERTH_TEST_PRIVATE_USER="$PRIVATE_USER" \
  BERTH_TEST_PRIVATE_PASSWORD="$PRIVATE_PASSWORD"

export BERTH_CONTAINERD_SOCKET
BERTH_TEST_REGISTRY="$REGISTRY_ADDR"
BERTH_BIN_DIR="$(berth_bin_dir debug)"
BERTH_TEST_DATA_DIR="$DATA_DIR"
# What tests keep for people to look at (the dashboard's screenshots).
BERTH_ARTIFACTS_DIR="${BERTH_ARTIFACTS_DIR:-$DATA_DIR/logs/artifacts}"
export BERTH_TEST_REGISTRY BERTH_BIN_DIR BERTH_TEST_DATA_DIR BERTH_ARTIFACTS_DIR
berth_log "BERTH_CONTAINERD_SOCKET=$BERTH_CONTAINERD_SOCKET"
berth_log "BERTH_TEST_REGISTRY=$BERTH_TEST_REGISTRY"
berth_log "BERTH_BIN_DIR=$BERTH_BIN_DIR"

# ---------------------------------------------------------------- tests
berth_log "cargo test --workspace $* (output also in $TEST_LOG)"
set +e
# --no-fail-fast: one failing test binary does not hide the results of the others.
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$TEST_LOG"
TEST_RC=${PIPESTATUS[0]}
set -e

# ---------------------------------------------------------------- the same, sandboxed
# The run-path suites once more with every runner they create sandboxed (gVisor's runsc, which
# the agents find on PATH): one suite, both runtimes (issue #16). Full runs only.
SANDBOX_SUITES=(runs cleanup files isolation limits secrets agent_recovery network_none)
if (($# == 0)); then
  args=()
  for s in "${SANDBOX_SUITES[@]}"; do args+=(--test "$s"); done
  berth_log "the run-path suites again, sandboxed: BERTH_TEST_ISOLATION=sandbox cargo test -p berth-e2e ${args[*]}"
  set +e
  BERTH_TEST_ISOLATION=sandbox cargo test -p berth-e2e --no-fail-fast "${args[@]}" 2>&1 | tee -a "$TEST_LOG"
  SANDBOX_RC=${PIPESTATUS[0]}
  set -e
  if ((SANDBOX_RC != 0 && TEST_RC == 0)); then
    TEST_RC=$SANDBOX_RC
  fi
fi

# Add up the "test result:" lines of all test binaries (the sandboxed pass included).
read -r PASSED FAILED IGNORED BINARIES < <(awk '
  /^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i) ~ /^passed;?$/)  p += $(i - 1)
      if ($(i) ~ /^failed;?$/)  f += $(i - 1)
      if ($(i) ~ /^ignored;?$/) g += $(i - 1)
    }
    n++
  }
  END { printf "%d %d %d %d\n", p, f, g, n }' "$TEST_LOG")
if ((TEST_RC == 0)); then
  record tests "ok: $PASSED passed, $FAILED failed, $IGNORED ignored ($BINARIES test binaries)"
else
  record tests "FAILED (exit $TEST_RC): $PASSED passed, $FAILED failed, $IGNORED ignored ($BINARIES test binaries)"
  FAILED_NAMES="$(grep -E '^test .* \.\.\. FAILED$' "$TEST_LOG" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | sort -u | head -n 30 || true)"
fi

# ---------------------------------------------------------------- schemathesis
# The live API against its own OpenAPI document (deploy/schemathesis.sh). Skipped when cargo
# test was given a filter (a partial run), and with BERTH_SKIP_SCHEMATHESIS=1.
ST_RC=0
if (($# == 0)) && [[ "${BERTH_SKIP_SCHEMATHESIS:-0}" != 1 ]]; then
  # Its report goes to the log (shown whole on failure), so cargo test's closing lines stay the
  # last test-runner output.
  berth_log "schemathesis against /v1/openapi.json (log: $DATA_DIR/logs/schemathesis.log)"
  bash "$BERTH_REPO/deploy/schemathesis.sh" >"$DATA_DIR/logs/schemathesis.log" 2>&1 || ST_RC=$?
  if ((ST_RC == 0)); then
    record openapi "ok: $(grep -Eo '[0-9]+ generated, [0-9]+ passed' "$DATA_DIR/logs/schemathesis.log" | tail -n1)"
  else
    cat "$DATA_DIR/logs/schemathesis.log"
    record openapi "FAILED (exit $ST_RC): see $DATA_DIR/logs/schemathesis.log"
  fi
fi
summary

if ((TEST_RC != 0)); then
  exit "$TEST_RC"
fi
if ((ST_RC != 0)); then
  exit "$ST_RC"
fi
if ((PKG_RC != 0)); then
  exit "$PKG_RC"
fi
exit "$LINT_FAILED"
