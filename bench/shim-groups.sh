#!/usr/bin/env bash
# What containerd's runc v2 shim costs per run, one shim per container against shims serving a
# group of containers (the OCI annotation io.containerd.runc.v2.group), on the containerd of the
# fleet deploy/up.sh started (issue #13, item 5). Not yet used by the agent: this measures the
# lever before building it.
#
#   bench/shim-groups.sh [N] [GROUP SIZE...]     default: 200 runs, group sizes 0 (none) 25 100
#
# For each group size: starts N detached `sleep 3600` containers of the fleet's busybox in the
# containerd namespace `density-exp` with `ctr run -d`, then reports the shim processes, their
# PSS and RSS per run (PSS shares the shim binary's pages fairly; RSS counts them in every
# shim), and the growth of the host's used memory per run (`free`: shims, runc's leftovers,
# the sleeping processes, kernel objects); then kills and removes them all. The start rate is
# ctr's (one ctr process per container), not Berth's.
set -euo pipefail
S=${BERTH_CONTAINERD_SOCKET:-/var/lib/berth/fleet/containerd/containerd.sock}
NS=density-exp
IMG=${BERTH_REGISTRY:-127.0.0.1:5000}/busybox:latest
N=${1:-200}
shift || true
SIZES=("$@")
((${#SIZES[@]})) || SIZES=(0 25 100)

shims() { pgrep -f "containerd-shim-runc-v2 -namespace $NS " || true; }
clean() {
  for c in $(ctr -a "$S" -n "$NS" tasks ls -q); do ctr -a "$S" -n "$NS" tasks kill -s KILL "$c" >/dev/null 2>&1 || true; done
  sleep 1
  for c in $(ctr -a "$S" -n "$NS" containers ls -q); do
    ctr -a "$S" -n "$NS" tasks delete "$c" >/dev/null 2>&1 || true
    ctr -a "$S" -n "$NS" containers delete "$c" >/dev/null 2>&1 || true
  done
}

ctr -a "$S" -n "$NS" images pull --plain-http "$IMG" >/dev/null
clean
for G in "${SIZES[@]}"; do
  before=$(free -k | awk '/Mem:/{print $3}')
  t0=$(date +%s.%N)
  for i in $(seq 1 "$N"); do
    ann=()
    ((G > 0)) && ann=(--annotation "io.containerd.runc.v2.group=g$(((i - 1) / G))")
    ctr -a "$S" -n "$NS" run -d "${ann[@]}" "$IMG" "d$i" sleep 3600 >/dev/null
  done
  t1=$(date +%s.%N)
  sleep 2
  pss=0 rss=0 count=0
  for p in $(shims); do
    pss=$((pss + $(awk '/^Pss:/{print $2}' "/proc/$p/smaps_rollup")))
    rss=$((rss + $(awk '/^VmRSS:/{print $2}' "/proc/$p/status")))
    count=$((count + 1))
  done
  after=$(free -k | awk '/Mem:/{print $3}')
  printf 'runs %d, group size %s: %d shims; shim PSS %d KiB/run, shim RSS %d KiB/run; host used memory +%d KiB/run; ctr start %.1f runs/s\n' \
    "$N" "$([[ $G == 0 ]] && echo none || echo "$G")" "$count" $((pss / N)) $((rss / N)) $(((after - before) / N)) \
    "$(echo "$N / ($t1 - $t0)" | bc -l)"
  clean
done
