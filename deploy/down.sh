#!/usr/bin/env bash
# Stop what deploy/up.sh started: berth-api, the node agents, berth-scheduler,
# then containerd (after killing its running tasks) with its shims, and the
# registry. Idempotent; prints nothing when nothing runs.
#
#   deploy/down.sh            stop the fleet (BERTH_DATA_DIR, default /var/lib/berth/fleet)
#   deploy/down.sh --all      also stop a test instance left by deploy/test.sh
#   deploy/down.sh --purge    stop, then delete the data dir(s) and .berth/env
set -euo pipefail

# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DIRS=("${BERTH_DATA_DIR:-/var/lib/berth/fleet}")
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
  # Berth processes first (clients before the scheduler), then infrastructure.
  berth_stop_pidfile "$data/run/api.pid"
  for f in "$data"/run/agent-*.pid; do
    [[ -e "$f" ]] && berth_stop_pidfile "$f"
  done
  berth_stop_pidfile "$data/run/scheduler.pid"
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
