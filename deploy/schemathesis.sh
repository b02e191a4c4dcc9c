#!/usr/bin/env bash
# Fuzz the live API against its own OpenAPI document with schemathesis.
#
#   deploy/schemathesis.sh
#
# Needs what deploy/test.sh exports (BERTH_CONTAINERD_SOCKET, BERTH_TEST_REGISTRY,
# BERTH_BIN_DIR: the test containerd, the test registry holding busybox:latest, the debug
# binaries). Installs schemathesis (pinned, from PyPI) into a venv under /var/lib/berth, starts
# a fleet of its own on loopback ports (scheduler + api + one agent with 2 run slots), creates a
# runner and one finished run so real ids can be hit, then runs schemathesis against
# GET /v1/openapi.json with the token. Any server error (5xx), response that violates the
# document (body schema, status code, content type) or a run that does not finish in time fails
# the script. The fleet is stopped and its containerd namespace emptied at the end.
#
# Environment: BERTH_SCHEMATHESIS_MAX_EXAMPLES (default 100 per operation),
# BERTH_SCHEMATHESIS_SEED (default random; printed for reproduction).
set -euo pipefail

# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCHEMATHESIS_VERSION=4.32.5
VENV="${BERTH_SCHEMATHESIS_VENV:-/var/lib/berth/schemathesis-$SCHEMATHESIS_VERSION}"
MAX_EXAMPLES="${BERTH_SCHEMATHESIS_MAX_EXAMPLES:-100}"
SEED="${BERTH_SCHEMATHESIS_SEED:-$((RANDOM * 32768 + RANDOM))}"

: "${BERTH_CONTAINERD_SOCKET:?run through deploy/test.sh (or export the test containerd socket)}"
: "${BERTH_TEST_REGISTRY:?run through deploy/test.sh (or export the test registry address)}"
: "${BERTH_BIN_DIR:?run through deploy/test.sh (or export the directory of the debug binaries)}"

# ---------------------------------------------------------------- schemathesis
if [[ ! -x "$VENV/bin/st" ]] || ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  berth_log "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

# ---------------------------------------------------------------- a fleet of its own
WORK="${BERTH_TEST_DATA_DIR:-/var/lib/berth/test}/schemathesis"
rm -rf "$WORK"
mkdir -p "$WORK/logs" "$WORK/run" "$WORK/report"
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
SCHED_ADDR="127.0.0.1:$(free_port)"
API_ADDR="127.0.0.1:$(free_port)"
API="http://$API_ADDR"
TOKEN="schemathesis-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
NODE_ID="st-$$"
NAMESPACE="berth-$NODE_ID"

# shellcheck disable=SC2317  # invoked by the EXIT trap
stop_fleet() {
  local rc=$? sock="$BERTH_CONTAINERD_SOCKET" what id ids=()
  berth_stop_pidfile "$WORK/run/api.pid" 5
  berth_stop_pidfile "$WORK/run/agent.pid" 10
  berth_stop_pidfile "$WORK/run/scheduler.pid" 5
  # Whatever the agent left in its namespace (it normally cleans up after each run).
  while read -r id; do
    [[ -n "$id" ]] || continue
    timeout 10 ctr --address "$sock" -n "$NAMESPACE" tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true
    timeout 10 ctr --address "$sock" -n "$NAMESPACE" tasks delete -f "$id" >/dev/null 2>&1 || true
  done < <(timeout 10 ctr --address "$sock" -n "$NAMESPACE" tasks ls -q 2>/dev/null || true)
  for what in containers images leases; do
    while read -r id; do
      [[ -n "$id" ]] || continue
      timeout 10 ctr --address "$sock" -n "$NAMESPACE" "$what" rm "$id" >/dev/null 2>&1 || true
    done < <(timeout 10 ctr --address "$sock" -n "$NAMESPACE" "$what" ls -q 2>/dev/null || true)
  done
  # Snapshots form chains and go child first: a few passes remove a chain of any layer order.
  for _ in 1 2 3 4 5 6 7 8; do
    mapfile -t ids < <(timeout 10 ctr --address "$sock" -n "$NAMESPACE" snapshots ls 2>/dev/null |
      awk 'NR > 1 {print $1}')
    ((${#ids[@]} > 0)) || break
    for id in "${ids[@]}"; do
      timeout 10 ctr --address "$sock" -n "$NAMESPACE" snapshots rm "$id" >/dev/null 2>&1 || true
    done
  done
  # The agent's cgroup directories (empty once its runs are gone), deepest first.
  find /sys/fs/cgroup/*/berth/"$NODE_ID" -depth -type d -exec rmdir {} + 2>/dev/null || true
  # Content goes with containerd's garbage collection, shortly after the images: retry a while.
  local removed=0
  for _ in $(seq 1 20); do
    if timeout 10 ctr --address "$sock" namespaces rm "$NAMESPACE" >/dev/null 2>&1; then
      removed=1
      break
    fi
    sleep 0.5
  done
  ((removed)) || berth_warn "containerd namespace $NAMESPACE is not empty; left in place"
  exit "$rc"
}
trap stop_fleet EXIT

berth_spawn "$WORK/run/scheduler.pid" "$WORK/logs/scheduler.log" \
  "$BERTH_BIN_DIR/berth-scheduler" --grpc-listen "$SCHED_ADDR" --data-dir "$WORK/scheduler" \
  --default-registry "$BERTH_TEST_REGISTRY" --heartbeat-interval-seconds 1 --stop-grace-seconds 1 \
  --webhook-allowed-hosts 127.0.0.1
# Fuzzed runners get notify_urls of any host: the scheduler refuses every one without a lookup
# (127.0.0.1 is allowed by name, then refused as a private address), so no traffic leaves.
(umask 077 && printf '%s\n' "$TOKEN" >"$WORK/token")
berth_spawn "$WORK/run/api.pid" "$WORK/logs/api.log" \
  "$BERTH_BIN_DIR/berth-api" --listen "$API_ADDR" --scheduler "http://$SCHED_ADDR" --token-file "$WORK/token"
# Two run slots and short timeouts: whatever runs the fuzzer creates, at most two containers run.
berth_spawn "$WORK/run/agent.pid" "$WORK/logs/agent.log" \
  "$BERTH_BIN_DIR/berth-node-agent" --scheduler "http://$SCHED_ADDR" --node-id "$NODE_ID" \
  --region ams --memory-mib 2048 --cpus 1 --max-runs 2 --pids-limit 64 \
  --containerd-socket "$BERTH_CONTAINERD_SOCKET" --state-dir "$WORK/agent" \
  --shutdown-grace-seconds 2

api() { # METHOD PATH [BODY]
  curl -sS --max-time 30 -X "$1" -H "Authorization: Bearer $TOKEN" \
    -H 'Content-Type: application/json' "$API$2" ${3:+-d "$3"}
}
LOGS=("$WORK/logs/scheduler.log" "$WORK/logs/api.log" "$WORK/logs/agent.log")
ready=0
for _ in $(seq 1 150); do
  if api GET /v1/nodes 2>/dev/null | jq -e --arg n "$NODE_ID" \
    '.nodes[] | select(.id == $n and .status == "ready")' >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.2
done
((ready)) || berth_die "the fleet did not come up" "${LOGS[@]}"

RUNNER_ID="$(api POST /v1/runners '{"name": "schemathesis", "image_name": "busybox", "image_tag": "latest",
  "run_command": "echo one; echo two >&2", "region": "ams", "instance_type": "standard-xs",
  "timeout_seconds": 10}' | jq -r '.runner.id // empty')"
[[ -n "$RUNNER_ID" ]] || berth_die "could not create the runner" "${LOGS[@]}"
# DELETE gets a runner of its own, so the one above stays for the other operations.
DOOMED_ID="$(api POST /v1/runners '{"name": "schemathesis-doomed", "image_name": "busybox",
  "image_tag": "latest", "run_command": "true", "region": "ams", "instance_type": "standard-xs"}' |
  jq -r '.runner.id // empty')"
[[ -n "$DOOMED_ID" ]] || berth_die "could not create the second runner" "${LOGS[@]}"
RUN_ID="$(api POST "/v1/runners/$RUNNER_ID/runs" | jq -r '.run.id // empty')"
[[ -n "$RUN_ID" ]] || berth_die "could not start the run" "${LOGS[@]}"
status=
for _ in $(seq 1 300); do
  status="$(api GET "/v1/runners/$RUNNER_ID/runs/$RUN_ID" | jq -r '.run.status')"
  [[ "$status" == succeeded ]] && break
  sleep 0.2
done
# Ended, so its log stream ends too instead of waiting for lines.
[[ "$status" == succeeded ]] || berth_die "the run did not succeed: $status" "${LOGS[@]}"
berth_log "fleet up: api $API, runner $RUNNER_ID, run $RUN_ID (succeeded)"

# ---------------------------------------------------------------- schemathesis
# The runner's own operations get the real ids (so they reach the scheduler, not only 404);
# DELETE gets the second runner's, drain/resume the node's. Every other id is generated.
cat >"$WORK/schemathesis.toml" <<EOF
# Each run starts afresh (and writes nothing into the checkout).
[cache]
enabled = false

[[operations]]
include-path-regex = '^/v1/runners/\{id\}/'
parameters = { "path.id" = "\${ST_RUNNER_ID}", "path.run_id" = "\${ST_RUN_ID}" }

[[operations]]
include-operation-id = ["get_runner", "update_runner"]
parameters = { "path.id" = "\${ST_RUNNER_ID}" }

[[operations]]
include-operation-id = ["drain_node", "resume_node"]
parameters = { "path.id" = "\${ST_NODE_ID}" }

[[operations]]
include-operation-id = "delete_runner"
parameters = { "path.id" = "\${ST_DOOMED_ID}" }
EOF

CHECKS=not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,negative_data_rejection
berth_log "schemathesis $SCHEMATHESIS_VERSION: checks $CHECKS, $MAX_EXAMPLES examples per operation, seed $SEED"
set +e
cd "$WORK"
ST_RUNNER_ID="$RUNNER_ID" ST_RUN_ID="$RUN_ID" ST_DOOMED_ID="$DOOMED_ID" ST_NODE_ID="$NODE_ID" timeout 600 "$VENV/bin/st" \
  --config-file "$WORK/schemathesis.toml" run "$API/v1/openapi.json" \
  --header "Authorization: Bearer $TOKEN" \
  --checks "$CHECKS" \
  --phases examples,coverage,fuzzing \
  --max-examples "$MAX_EXAMPLES" \
  --seed "$SEED" \
  --workers 1 \
  --request-timeout 30 \
  --generation-database none \
  --no-color \
  --report junit --report-dir "$WORK/report"
ST_RC=$?
set -e
if ((ST_RC != 0)); then
  berth_show_log "$WORK/logs/api.log" 30
  berth_log "schemathesis FAILED (exit $ST_RC; seed $SEED; report in $WORK/report)"
  exit "$ST_RC"
fi
berth_log "schemathesis: no server error, every response as documented"
