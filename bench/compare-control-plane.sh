#!/usr/bin/env bash
# The control-plane benchmark, before and after a change, side by side in one run:
#
#   bench/compare-control-plane.sh BASE_REV [ROUNDS] [-- CONTROL-PLANE ARGS...]
#
# Builds BASE_REV (in a temporary git worktree) and the work tree, both in release mode, then
# alternates base and current ROUNDS times (default 4), each pair with its own bench binary and
# scheduler (the proto may differ between them), and prints every run and the current/base ratio
# of runs/s, p99 and scheduler CPU per round. Alternating keeps this noisy shared machine's drift
# out of the comparison.
set -euo pipefail
BASE_REV=${1:?usage: $0 BASE_REV [ROUNDS] [-- ARGS...]}
shift
ROUNDS=4
if [[ $# -gt 0 && $1 != -- ]]; then ROUNDS=$1; shift; fi
[[ ${1:-} == -- ]] && shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
WORK=$(mktemp -d /var/tmp/berth-compare.XXXXXX)
trap 'git -C "$REPO" worktree remove --force "$WORK/base-src" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

# The base gets a target directory of its own: cargo names a workspace's artifacts by paths
# relative to the workspace, so two checkouts sharing one target directory overwrite each
# other's generated code (the proto's) without noticing.
build() { # SRC TARGET DEST
  (cd "$1" && CARGO_TARGET_DIR=$2 cargo build --release -q -p berth-scheduler -p berth-bench)
  mkdir -p "$3"
  cp "$2/release/berth-scheduler" "$2/release/control-plane" "$3/"
}
git -C "$REPO" worktree add -q --detach "$WORK/base-src" "$BASE_REV"
build "$WORK/base-src" "$TARGET-compare-base" "$WORK/base"
build "$REPO" "$TARGET" "$WORK/current"

for round in $(seq 1 "$ROUNDS"); do
  for which in base current; do
    line=$("$WORK/$which/control-plane" --scheduler-bin "$WORK/$which/berth-scheduler" "$@" 2>/dev/null | grep '^{' | tail -n1)
    echo "{\"build\":\"$which\",\"round\":$round,\"result\":$line}" | tee -a "$WORK/results.jsonl"
  done
done
python3 - "$WORK/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
get = lambda b, i: next(r["result"] for r in rows if r["build"] == b and r["round"] == i)
rounds = sorted({r["round"] for r in rows})
print("round  base runs/s  current runs/s  ratio  | p99 ratio | scheduler CPU ratio")
for i in rounds:
    b, c = get("base", i), get("current", i)
    print(f"{i:5}  {b['runs_per_sec']:11.1f}  {c['runs_per_sec']:14.1f}  {c['runs_per_sec']/b['runs_per_sec']:5.3f}  | "
          f"{c['p99_ms']/b['p99_ms']:9.3f} | {c['scheduler_cpu_seconds']/b['scheduler_cpu_seconds']:.3f}")
for b in ("base", "current"):
    rs = [get(b, i) for i in rounds]
    print(f"{b}: median {statistics.median(r['runs_per_sec'] for r in rs):.0f} runs/s, "
          f"median p99 {statistics.median(r['p99_ms'] for r in rs):.1f} ms, "
          f"duplicate assignments {sum(r['duplicate_assignments'] for r in rs)}")
PY
