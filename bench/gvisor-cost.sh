#!/usr/bin/env bash
# What it measures: the cost of gVisor (runsc) against runc, as the container
# runtime's own cost through containerd (not Berth's POST -> end), in two parts:
#   (a) start: wall time of `ctr run --rm IMAGE ID /bin/true` with runc vs with
#       the runsc wrapper Berth's node agent writes for runs without network,
#       timed alternately (runc, runsc, runc, ...), ROUNDS rounds each, after one
#       untimed warm-up of each; prints p50/p90 of each and the ratios
#       (runsc/runc of the medians, and the median of the pairwise ratios).
#   (b) memory per sleeping container: start N containers running `sleep 600`
#       detached with one runtime, let them settle, and read the increase of
#       used host memory (MemTotal - MemAvailable in /proc/meminfo, averaged over
#       SAMPLES samples 1 s apart, before and after) divided by N; also the sum
#       of VmRSS (and of Pss, which splits shared pages) of each container's
#       shim and everything under it (runc: the sleep; runsc: sandbox, gofer and
#       the ptrace stub processes) per container. Then kill and remove them and
#       do the same with the other runtime; MEM_ROUNDS rounds of runc then runsc.
#
# Container ids are zero-padded on purpose: runsc looks a container up by id
# PREFIX, so with "x-1" and "x-10" both present `kill x-1` fails as ambiguous.
#
# The runsc wrapper is exactly what the node agent writes for a node whose runs
# have no network (BinaryName of containerd's runc v2 shim, set here with
# `ctr run --runc-binary`):
#   exec '/usr/bin/runsc' --platform=ptrace --network=none --oci-seccomp "$@"
# --network=none: this old Debian runsc (0.0~20221219) fails with
# --network=sandbox on 6.x kernels (gVisor issue 10704), so network is off.
#
# How to run (as root, needs ctr, a running containerd and a registry holding
# busybox; every container, task and snapshot made here is removed on exit,
# also on error or Ctrl-C; the image is removed too unless KEEP_IMAGE=1):
#   bash bench/gvisor-cost.sh
#   SOCK=/run/containerd/containerd.sock REGISTRY=127.0.0.1:5001 ROUNDS=30 N=10 bash bench/gvisor-cost.sh
# The machine should be otherwise idle; on a noisy one trust the ratios of the
# same run more than any absolute figure.
set -euo pipefail

SOCK=${SOCK:-/var/lib/berth/test/containerd/containerd.sock}
REGISTRY=${REGISTRY:-127.0.0.1:5001}
NS=${NS:-bench-gvisor}
RUNSC=${RUNSC:-/usr/bin/runsc}
ROUNDS=${ROUNDS:-20}        # timed starts per runtime
N=${N:-10}                  # sleeping containers per memory phase
SAMPLES=${SAMPLES:-5}       # meminfo samples, 1 s apart
SETTLE=${SETTLE:-5}         # seconds to wait before sampling
MEM_ROUNDS=${MEM_ROUNDS:-2} # memory phases per runtime (runc, runsc, runc, ...)
KEEP_IMAGE=${KEEP_IMAGE:-0}
IMAGE="$REGISTRY/busybox:latest"
PREFIX="gvcost-$$"

ctr_() { ctr --address "$SOCK" --namespace "$NS" "$@"; }

TMP=$(mktemp -d /tmp/gvisor-cost.XXXXXX)
WRAPPER="$TMP/runsc-wrapper"
printf '%s\n' '#!/bin/sh' "exec '$RUNSC' --platform=ptrace --network=none --oci-seccomp \"\$@\"" >"$WRAPPER"
chmod 0700 "$WRAPPER"

cleanup() {
  set +e
  local c
  for c in $(ctr_ containers ls -q 2>/dev/null | grep "^$PREFIX-"); do
    ctr_ tasks kill -s SIGKILL "$c" >/dev/null 2>&1
    ctr_ tasks delete -f "$c" >/dev/null 2>&1
    ctr_ containers delete "$c" >/dev/null 2>&1
  done
  if [ "$KEEP_IMAGE" != 1 ]; then
    ctr_ images rm --sync "$IMAGE" >/dev/null 2>&1
    ctr --address "$SOCK" namespaces rm "$NS" >/dev/null 2>&1
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_ns() { date +%s%N; }

# p50 / p90 (nearest rank) of the numbers in a file, one per line
pct() { sort -g "$1" | awk -v p="$2" '{v[NR]=$1} END {i=int((p*NR+99)/100); if (i<1) i=1; printf "%.1f", v[i]}'; }

used_kib() { # mean of MemTotal - MemAvailable over SAMPLES samples, in KiB
  local i t a sum=0
  for ((i = 0; i < SAMPLES; i++)); do
    read -r t a < <(awk '/^MemTotal:/{t=$2} /^MemAvailable:/{a=$2} END{print t, a}' /proc/meminfo)
    sum=$((sum + t - a))
    sleep 1
  done
  echo $((sum / SAMPLES))
}

# descendants of a pid, itself included
tree() {
  local p=$1 c
  echo "$p"
  for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do tree "$c"; done
}

# "rss_kib pss_kib" summed over the shim of container $1 and all under it
shim_mem() {
  local shim p rss=0 pss=0 r s
  shim=$(pgrep -f -- "containerd-shim-runc-v2 -namespace $NS -id $1 " | head -n1)
  [ -n "$shim" ] || { echo "0 0"; return; }
  for p in $(tree "$shim"); do
    r=$(awk '/^VmRSS:/{print $2}' /proc/"$p"/status 2>/dev/null || true)
    s=$(awk '/^Pss:/{print $2}' /proc/"$p"/smaps_rollup 2>/dev/null || true)
    rss=$((rss + ${r:-0})); pss=$((pss + ${s:-0}))
  done
  echo "$rss $pss"
}

echo "== setup: $(date -u +%FT%TZ), $(nproc) cores, kernel $(uname -r), $("$RUNSC" --version 2>/dev/null | head -n1)"
ctr_ images pull --plain-http "$IMAGE" >/dev/null
echo "runsc wrapper: $(tail -n1 "$WRAPPER")"
echo "runsc says uname -r = $(ctr_ run --rm --runc-binary "$WRAPPER" "$IMAGE" "$PREFIX-check" uname -r)"

# ---- (a) start -------------------------------------------------------------
start_one() { # $1 = runc|runsc, $2 = id; prints ms
  local t0 t1
  t0=$(now_ns)
  if [ "$1" = runsc ]; then
    ctr_ run --rm --runc-binary "$WRAPPER" "$IMAGE" "$2" /bin/true
  else
    ctr_ run --rm "$IMAGE" "$2" /bin/true
  fi
  t1=$(now_ns)
  awk -v d=$((t1 - t0)) 'BEGIN{printf "%.1f\n", d/1e6}'
}

echo "== (a) ctr run --rm $IMAGE /bin/true: warm-up, then $ROUNDS rounds each, alternately"
start_one runc "$PREFIX-w1" >/dev/null
start_one runsc "$PREFIX-w2" >/dev/null
: >"$TMP/runc.ms"; : >"$TMP/runsc.ms"; : >"$TMP/ratio"
for ((i = 1; i <= ROUNDS; i++)); do
  a=$(start_one runc "$(printf '%s-a%03d' "$PREFIX" "$i")"); echo "$a" >>"$TMP/runc.ms"
  b=$(start_one runsc "$(printf '%s-b%03d' "$PREFIX" "$i")"); echo "$b" >>"$TMP/runsc.ms"
  awk -v a="$a" -v b="$b" 'BEGIN{printf "%.3f\n", b/a}' >>"$TMP/ratio"
  printf '  round %2d: runc %7.1f ms  runsc %7.1f ms\n' "$i" "$a" "$b"
done
A50=$(pct "$TMP/runc.ms" 50); A90=$(pct "$TMP/runc.ms" 90)
B50=$(pct "$TMP/runsc.ms" 50); B90=$(pct "$TMP/runsc.ms" 90)
R50=$(awk -v a="$A50" -v b="$B50" 'BEGIN{printf "%.2f", b/a}')
RP=$(sort -g "$TMP/ratio" | awk '{v[NR]=$1} END{i=int((50*NR+99)/100); printf "%.2f", v[i]}')

# ---- (b) memory ------------------------------------------------------------
mem_phase() { # $1 = runc|runsc, $2 = round; appends "delta_per rss_per pss_per" to $TMP/$1.mem
  local rt=$1 r=$2 i id before after rss=0 pss=0 m
  sleep "$SETTLE"
  before=$(used_kib)
  for ((i = 1; i <= N; i++)); do
    printf -v id '%s-%s%02d-%02d' "$PREFIX" "$rt" "$r" "$i"
    if [ "$rt" = runsc ]; then
      ctr_ run -d --runc-binary "$WRAPPER" "$IMAGE" "$id" sleep 600 >/dev/null
    else
      ctr_ run -d "$IMAGE" "$id" sleep 600 >/dev/null
    fi
  done
  sleep "$SETTLE"
  after=$(used_kib)
  for ((i = 1; i <= N; i++)); do
    printf -v id '%s-%s%02d-%02d' "$PREFIX" "$rt" "$r" "$i"
    read -r a b < <(shim_mem "$id")
    rss=$((rss + a)); pss=$((pss + b))
  done
  running=$(ctr_ tasks ls | grep -c "^$PREFIX-$rt$(printf %02d "$r")-.*RUNNING" || true)
  for ((i = 1; i <= N; i++)); do
    printf -v id '%s-%s%02d-%02d' "$PREFIX" "$rt" "$r" "$i"
    ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    ctr_ tasks delete -f "$id" >/dev/null 2>&1 || true
    ctr_ containers delete "$id" >/dev/null 2>&1 || echo "  could not remove $id yet; the exit trap retries" >&2
  done
  m=$(awk -v d=$((after - before)) -v r=$rss -v p=$pss -v n="$N" 'BEGIN{printf "%.1f %.1f %.1f", d/n/1024, r/n/1024, p/n/1024}')
  echo "$m" >>"$TMP/$rt.mem"
  read -r d rr pp <<<"$m"
  printf '  %-5s round %d: %d/%d running; used %+.1f MiB per container; shim tree VmRSS %.1f MiB, Pss %.1f MiB per container\n' \
    "$rt" "$r" "$running" "$N" "$d" "$rr" "$pp"
}

echo "== (b) $N x 'sleep 600' detached per phase, settle ${SETTLE}s, $SAMPLES meminfo samples, $MEM_ROUNDS rounds each"
: >"$TMP/runc.mem"; : >"$TMP/runsc.mem"
for ((r = 1; r <= MEM_ROUNDS; r++)); do
  mem_phase runc "$r"
  mem_phase runsc "$r"
done
col() { awk -v c="$2" '{print $c}' "$1" >"$TMP/col"; pct "$TMP/col" 50; }
MA=$(col "$TMP/runc.mem" 1); MB=$(col "$TMP/runsc.mem" 1)
RA=$(col "$TMP/runc.mem" 2); RB=$(col "$TMP/runsc.mem" 2)
PA=$(col "$TMP/runc.mem" 3); PB=$(col "$TMP/runsc.mem" 3)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{if (a > 0) printf "%.1f", b/a; else print "n/a"}'; }

echo
echo "== result ($ROUNDS start rounds each; memory: median of $MEM_ROUNDS phases of $N containers)"
printf '| %-40s | %9s | %9s | %18s |\n' "figure" "runc" "runsc" "runsc / runc"
printf '|%s|%s|%s|%s|\n' "------------------------------------------" "-----------" "-----------" "--------------------"
printf '| %-40s | %9s | %9s | %18s |\n' "start, ctr run --rm /bin/true, p50 (ms)" "$A50" "$B50" "$R50 (pairs $RP)"
printf '| %-40s | %9s | %9s | %18s |\n' "start, p90 (ms)" "$A90" "$B90" "$(ratio "$A90" "$B90")"
printf '| %-40s | %9s | %9s | %18s |\n' "host used memory per container (MiB)" "$MA" "$MB" "$(ratio "$MA" "$MB")"
printf '| %-40s | %9s | %9s | %18s |\n' "shim tree VmRSS per container (MiB)" "$RA" "$RB" "$(ratio "$RA" "$RB")"
printf '| %-40s | %9s | %9s | %18s |\n' "shim tree Pss per container (MiB)" "$PA" "$PB" "$(ratio "$PA" "$PB")"
