#!/usr/bin/env bash
# What the dashboard's pages cost with many runs (issue #14: "it stays fast with 10,000 runs").
#
#   bench/dashboard-pages.sh [RUNS]      (default 10000)
#
# Against the fleet of deploy/up.sh (reads .berth/env). Creates two runners in region `lon`,
# where the local fleet has no node, so their runs wait: a baseline runner with one run, and one
# with RUNS runs (batches of 1,000). Then times, with `hey` (200 requests, 4 at a time), each
# request a page makes — the queue's first page and a page deep in it, the runner's newest runs
# and an older page, one run — for the baseline and for RUNS, and prints the ratios. Then stops
# the RUNS runs (they become history) and times the runner's pages again. Everything it created
# is left canceled (runs cannot be deleted); runners are deleted.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=/dev/null
. .berth/env
RUNS="${1:-10000}"
N=200
C=4
command -v hey >/dev/null || { echo "needs hey (apt-get install hey)" >&2; exit 1; }

api() { # METHOD PATH [BODY]
  curl -sf -X "$1" -H "Authorization: Bearer $BERTH_TOKEN" -H 'Content-Type: application/json' \
    ${3:+-d "$3"} "$BERTH_URL$2"
}
runner() {
  api POST /v1/runners "$(jq -nc --arg n "$1" '{name: $n, image_name: "busybox", image_tag: "latest",
    run_command: "true", region: "lon", instance_type: "standard-s", timeout_seconds: 60}')" | jq -r .runner.id
}
# p50 and p99 in ms of GET PATH
timed() {
  hey -n "$N" -c "$C" -H "Authorization: Bearer $BERTH_TOKEN" "$BERTH_URL$1" |
    awk '/50%+ in/ {p50=$3} /99%+ in/ {p99=$3} /Status code distribution/ {codes=1} codes && /\[/ {c=c $0}
         END {printf "%.2f %.2f %s\n", p50*1000, p99*1000, (c ~ /\[200\]/ && c !~ /\[[345][0-9][0-9]\]/) ? "ok" : "ERR " c}'
}

base=$(runner bench-base)
many=$(runner bench-many)
api POST "/v1/runners/$base/runs" '{}' >/dev/null
bone=$(api GET "/v1/runners/$base/runs?limit=1" | jq -r '.runs[0].id')
# The baseline: one waiting run in all.
read -r q50 q99 qok < <(timed "/v1/runs?status=pending")
read -r r50 r99 rok < <(timed "/v1/runners/$base/runs?order=desc&limit=50")
read -r o50 o99 ook < <(timed "/v1/runners/$base/runs/$bone")

echo "creating $RUNS waiting runs ..." >&2
left=$RUNS
while ((left > 0)); do
  n=$((left < 1000 ? left : 1000))
  api POST "/v1/runners/$many/runs/batch" "$(jq -nc --argjson n "$n" '{runs: [range($n) | {}]}')" >/dev/null
  left=$((left - n))
done
deep=$(api GET "/v1/runs?status=pending&region=lon&limit=1000" | jq -r '.runs[-1].id')
old=$(api GET "/v1/runners/$many/runs?order=desc&limit=1000" | jq -r '.runs[-1].id')
one=$(api GET "/v1/runners/$many/runs?limit=1" | jq -r '.runs[0].id')

row() { # LABEL BASE_P50 BASE_P99 BASE_OK PATH
  read -r m50 m99 mok < <(timed "$5")
  printf '| %s | %s / %s | %s / %s | %.2f× | %s/%s |\n' "$1" "$2" "$3" "$m50" "$m99" \
    "$(echo "$m50 / $2" | bc -l)" "$4" "$mok"
}
echo
echo "| request (GET) | 1 run: p50 / p99 ms | $RUNS runs: p50 / p99 ms | p50 ratio | answers |"
echo "|---|---|---|---|---|"
row "queue, first page (100)" "$q50" "$q99" "$qok" "/v1/runs?status=pending"
row "queue, 100 after 1,000" "$q50" "$q99" "$qok" "/v1/runs?status=pending&after=$deep"
row "runner's newest 50" "$r50" "$r99" "$rok" "/v1/runners/$many/runs?order=desc&limit=50"
row "runner's 50 after 1,000" "$r50" "$r99" "$rok" "/v1/runners/$many/runs?order=desc&limit=50&after=$old"
row "one run (waiting)" "$o50" "$o99" "$ook" "/v1/runners/$many/runs/$one"

echo "stopping the $RUNS runs (they become history) ..." >&2
after=""
while :; do
  page=$(api GET "/v1/runners/$many/runs?limit=1000${after:+&after=$after}")
  jq -r '.runs[].id' <<<"$page" | xargs -P 8 -I{} curl -sf -o /dev/null -X POST \
    -H "Authorization: Bearer $BERTH_TOKEN" "$BERTH_URL/v1/runners/$many/runs/{}/stop"
  after=$(jq -r '.next_after // empty' <<<"$page")
  [[ -n "$after" ]] || break
done
api POST "/v1/runners/$base/runs/$bone/stop" >/dev/null || true
echo
echo "| request (GET), the runs ended | 1 run: p50 / p99 ms | $RUNS runs: p50 / p99 ms | p50 ratio | answers |"
echo "|---|---|---|---|---|"
row "runner's newest 50" "$r50" "$r99" "$rok" "/v1/runners/$many/runs?order=desc&limit=50"
row "runner's 50 after 1,000" "$r50" "$r99" "$rok" "/v1/runners/$many/runs?order=desc&limit=50&after=$old"
row "one run (ended)" "$o50" "$o99" "$ook" "/v1/runners/$many/runs/$one"
api DELETE "/v1/runners/$base" >/dev/null || true
api DELETE "/v1/runners/$many" >/dev/null || true
