#!/usr/bin/env bash
# Restart one service of the fleet deploy/up.sh started, and only it.
#
#   deploy/restart.sh SERVICE...        scheduler, api, agent-fra-1, agent-ams-1, or agents
#   deploy/restart.sh --ha SERVICE...   in the fleet of up.sh --ha: also scheduler-1/-2,
#                                       api-1/-2, etcd-1/-2/-3
#
# Stops SERVICE (SIGTERM, SIGKILL after 10 s), starts it again with the
# arguments up.sh gives it, and waits until the fleet answers again. Uses the
# binaries already built (BERTH_SKIP_BUILD=0 rebuilds) and runs no demo. The
# other services keep running: the API and the agents reconnect to a restarted
# scheduler by themselves; the API answers 503 `unavailable` meanwhile.
set -euo pipefail

# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(($#)) || berth_die "usage: deploy/restart.sh SERVICE... (scheduler, api, agent-fra-1, agent-ams-1, agents)"
args=()
for s in "$@"; do
  case "$s" in
    -h | --help)
      sed -n '2,12p' "$0"
      exit 0
      ;;
    --ha)
      args+=(--ha)
      continue
      ;;
  esac
  args+=(--restart "$s")
done
export BERTH_SKIP_BUILD="${BERTH_SKIP_BUILD:-1}" BERTH_SKIP_DEMO=1
exec "$(dirname "${BASH_SOURCE[0]}")/up.sh" "${args[@]}"
