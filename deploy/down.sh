#!/usr/bin/env bash
# Stop what deploy/up.sh started: berth-api, the node agents, berth-scheduler,
# then containerd (after killing its running tasks) with its shims, and the
# registry. Idempotent; prints nothing when nothing runs.
#
#   deploy/down.sh            stop the fleets of up.sh and up.sh --ha (BERTH_DATA_DIR: only that one)
#   deploy/down.sh --all      also stop a test instance left by deploy/test.sh
#   deploy/down.sh --purge    stop, then delete the data dir(s) and .berth/env
set -euo pipefail

# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ -n "${BERTH_DATA_DIR:-}" ]]; then
  DIRS=("$BERTH_DATA_DIR")
else
  DIRS=(/var/lib/berth/fleet /var/lib/berth/fleet-ha)
fi
PURGE=0
for arg in "$@"; do
  case "$arg" in
    --all) DIRS+=("${BERTH_TEST_DATA_DIR:-/var/lib/berth/test}") ;;
    --purge) PURGE=1 ;;
    -h | --help)
      sed -n '2,9p' "$0"
      exit 0
      ;;
    *) berth_die "unknown argument: $arg (see --help)" ;;
  esac
done

stop_instance() {
  local data="$1" f
  [[ -d "$data/run" ]] || return 0
  # Berth processes first (clients before the schedulers), then infrastructure (etcd last
  # of the Berth fleet: a scheduler stopping resigns through it).
  for f in "$data"/run/api*.pid "$data"/run/agent-*.pid "$data"/run/scheduler*.pid "$data"/run/etcd-*.pid; do
    [[ -e "$f" ]] && berth_stop_pidfile "$f"
  done
  berth_stop_containerd "$data"
  berth_stop_registry "$data"
  berth_stop_registry "$data" private-registry
  rm -f "$data"/run/*.stamp
}

for data in "${DIRS[@]}"; do
  stop_instance "$data"
  if ((PURGE)) && [[ -d "$data" ]]; then
    # Never delete through a mount that a leftover container still holds.
    if grep -qF " $data/" /proc/self/mounts; then
      berth_die "mounts remain under $data (see /proc/self/mounts); not deleting it"
    fi
    berth_log "deleting $data"
    rm -rf "$data"
  fi
done
if ((PURGE)); then
  rm -f "$BERTH_REPO/.berth/env"
fi
