#!/usr/bin/env bash
# Bring up a local Berth fleet and run a demo job on it.
#
#   deploy/up.sh                      bring up what is not running, run the demo
#   deploy/up.sh --ha                 the highly available fleet instead: three etcd members,
#                                     two schedulers (one leads), two API replicas, two agents
#   deploy/up.sh --restart SERVICE    also restart SERVICE (repeatable): scheduler, api,
#                                     agent-fra-1, agent-ams-1, or agents (both); with --ha
#                                     also scheduler-1/-2, api-1/-2, etcd-1/-2/-3
#
# Installs the Debian packages (once), builds the release binaries, starts
# containerd, a plain-HTTP registry with a busybox image, berth-scheduler,
# berth-api and two node agents (fra-1, ams-1), then runs a demo runner
# through the REST API and prints its logs. Safe to run again: running pieces
# are reused, and only a Berth process that is down, or whose binary or
# arguments changed, is (re)started; the others keep running (the API and the
# agents reconnect to a restarted scheduler by themselves). The demo runs again.
# deploy/restart.sh SERVICE restarts one service without building or the demo.
#
# With --ha the state lives in etcd (members on 127.0.0.1:2379, :22379, :32379), the
# schedulers listen on 127.0.0.1:7170 and :7171 (only the leader accepts connections), the
# API replicas on :8180 and :8181, the registry on :5100; data under /var/lib/berth/fleet-ha.
# It can run beside the single-machine fleet. Kill the leader (deploy/down.sh stops all).
#
# Environment (all optional):
#   BERTH_DATA_DIR   data, logs and pid files      (default /var/lib/berth/fleet, or fleet-ha)
#   BERTH_SKIP_BUILD=1   use the binaries already built
#   BERTH_SKIP_DEMO=1    bring the fleet up but do not run the demo
#   RUST_LOG         log filter for the Berth processes (default info)
#   BERTH_AGENT_MEMORY_MIB   memory each agent offers to runs (default 4096); the agents also
#                    read their other BERTH_AGENT_* settings from the environment (e.g.
#                    BERTH_AGENT_MAX_RUNS, BERTH_AGENT_SHIM_GROUP_SIZE, BERTH_AGENT_NETWORK)
set -euo pipefail

# shellcheck source=deploy/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RESTART=()
HA=0
while (($#)); do
  case "$1" in
    --ha)
      HA=1
      shift
      ;;
    --restart)
      [[ $# -ge 2 ]] || berth_die "--restart needs a service: scheduler, api, agent-fra-1, agent-ams-1, agents"
      case "$2" in
        scheduler | api | agent-fra-1 | agent-ams-1) RESTART+=("$2") ;;
        scheduler-[12] | api-[12] | etcd-[123]) RESTART+=("$2") ;;
        agents) RESTART+=(agent-fra-1 agent-ams-1) ;;
        *) berth_die "unknown service: $2 (scheduler, api, agent-fra-1, agent-ams-1, agents; with --ha scheduler-N, api-N, etcd-N)" ;;
      esac
      shift 2
      ;;
    -h | --help)
      sed -n '2,29p' "$0"
      exit 0
      ;;
    *) berth_die "unknown argument: $1 (see --help)" ;;
  esac
done

if ((HA)); then
  DATA_DIR="${BERTH_DATA_DIR:-/var/lib/berth/fleet-ha}"
  REGISTRY_ADDR=127.0.0.1:5100
  SCHEDULERS=(scheduler-1 scheduler-2)
  SCHEDULER_ADDRS=(127.0.0.1:7170 127.0.0.1:7171)
  APIS=(api-1 api-2)
  API_ADDRS=(127.0.0.1:8180 127.0.0.1:8181)
  ETCD_CLIENT_PORTS=(2379 22379 32379)
  ETCD_PEER_PORTS=(2380 22380 32380)
  # Prometheus metrics (/metrics, plain HTTP on loopback), one address per process.
  SCHEDULER_METRICS=(127.0.0.1:9570 127.0.0.1:9571)
  API_METRICS=(127.0.0.1:9580 127.0.0.1:9581)
  AGENT_METRICS_BASE=9590
else
  DATA_DIR="${BERTH_DATA_DIR:-/var/lib/berth/fleet}"
  REGISTRY_ADDR=127.0.0.1:5000
  SCHEDULERS=(scheduler)
  SCHEDULER_ADDRS=(127.0.0.1:7070)
  APIS=(api)
  API_ADDRS=(127.0.0.1:8080)
  ETCD_CLIENT_PORTS=()
  SCHEDULER_METRICS=(127.0.0.1:9470)
  API_METRICS=(127.0.0.1:9480)
  AGENT_METRICS_BASE=9490
fi
API_ADDR="${API_ADDRS[0]}"
API_URL="http://$API_ADDR"
# Every scheduler address, comma-separated: the API and the agents follow the leader.
SCHEDULER_URL="$(printf 'https://%s,' "${SCHEDULER_ADDRS[@]}")"
SCHEDULER_URL="${SCHEDULER_URL%,}"
LOG_DIR="$DATA_DIR/logs"
RUN_DIR="$DATA_DIR/run"
AGENTS=("fra-1 fra" "ams-1 ams")
export RUST_LOG="${RUST_LOG:-info}"

mkdir -p "$DATA_DIR" "$LOG_DIR" "$RUN_DIR"
TMP="$(mktemp -d /tmp/berth-up.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT

# ---------------------------------------------------------------- infrastructure

berth_install_packages
if [[ "${BERTH_SKIP_BUILD:-0}" != 1 ]]; then
  berth_build release
fi
BIN_DIR="$(berth_bin_dir release)"
for b in berth-scheduler berth-api berth-node-agent berthctl; do
  [[ -x "$BIN_DIR/$b" ]] || berth_die "binary $BIN_DIR/$b not found: did 'cargo build --release --bins' build it?"
done

SOCK="$(berth_start_containerd "$DATA_DIR")"
berth_start_registry "$DATA_DIR" "$REGISTRY_ADDR"
berth_build_busybox_image "$REGISTRY_ADDR"

# ---------------------------------------------------------------- token + env file

TOKEN_FILE="$DATA_DIR/token"
if [[ ! -s "$TOKEN_FILE" ]]; then
  (umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$TOKEN_FILE")
  berth_log "generated a new API token in $TOKEN_FILE"
fi
TOKEN="$(tr -d ' \n' <"$TOKEN_FILE")"
# The scheduler's control service serves only the API, which presents the cluster token; the
# agents enroll with registration tokens instead (below). Secrets are passed as files, never on
# command lines.
CLUSTER_TOKEN_FILE="$DATA_DIR/cluster.token"
if [[ ! -s "$CLUSTER_TOKEN_FILE" ]]; then
  (umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$CLUSTER_TOKEN_FILE")
fi
unset BERTH_CLUSTER_TOKEN BERTH_TOKEN BERTH_REGISTRATION_TOKEN

# TLS on every gRPC hop: the fleet's own CA and the schedulers' certificate (made once; the
# API and the agents verify the schedulers against ca.pem).
TLS_DIR="$DATA_DIR/tls"
if [[ ! -s "$TLS_DIR/ca.pem" ]]; then
  "$BIN_DIR/berthctl" admin tls init --dir "$TLS_DIR" --host 127.0.0.1 --host localhost >/dev/null ||
    berth_die "could not create the fleet's TLS certificates in $TLS_DIR"
  berth_log "created the fleet's CA and scheduler certificate in $TLS_DIR"
fi

ENV_DIR="$BERTH_REPO/.berth"
mkdir -p "$ENV_DIR"
# The directory ignores itself, so it is never committed even without a root
# .gitignore entry.
[[ -f "$ENV_DIR/.gitignore" ]] || printf '*\n' >"$ENV_DIR/.gitignore"
(
  umask 077
  cat >"$ENV_DIR/env.new" <<EOF
BERTH_URL=$API_URL
BERTH_TOKEN=$TOKEN
BERTH_REGISTRY=$REGISTRY_ADDR
EOF
)
mv -f "$ENV_DIR/env.new" "$ENV_DIR/env"

# ---------------------------------------------------------------- Berth processes

# stamp NAME CMD... — what identifies a running process as current: the
# binary's mtime/size/inode and the full command line.
proc_stamp() {
  shift
  printf '%s %s\n' "$(stat -c '%Y.%s.%i' "$1")" "$*"
}

# proc_current NAME CMD... — true if NAME runs and was started from the
# same binary with the same arguments.
proc_current() {
  local name="$1"
  berth_pid_alive "$RUN_DIR/$name.pid" "$(basename "$2")" &&
    [[ "$(cat "$RUN_DIR/$name.stamp" 2>/dev/null)" == "$(proc_stamp "$@")" ]]
}

# ensure_proc NAME CMD... — reuse NAME if current, else (re)start it.
ensure_proc() {
  local name="$1"
  if proc_current "$@"; then
    berth_log "$name already running (pid $(head -n1 "$RUN_DIR/$name.pid"))"
    return 0
  fi
  berth_stop_pidfile "$RUN_DIR/$name.pid"
  berth_log "starting $name (log $LOG_DIR/$name.log)"
  proc_stamp "$@" >"$RUN_DIR/$name.stamp"
  shift
  berth_spawn "$RUN_DIR/$name.pid" "$LOG_DIR/$name.log" "$@"
}

# check_alive NAME — die with NAME's log if its process is gone.
check_alive() {
  berth_pid_alive "$RUN_DIR/$1.pid" || berth_die "$1 exited" "$LOG_DIR/$1.log"
}

scheduler_cmd() { # INDEX
  SCHEDULER_CMD=("$BIN_DIR/berth-scheduler"
    --grpc-listen "${SCHEDULER_ADDRS[$1]}"
    --metrics-listen "${SCHEDULER_METRICS[$1]}"
    --data-dir "$DATA_DIR/${SCHEDULERS[$1]}"
    --default-registry "$REGISTRY_ADDR"
    --cluster-token-file "$CLUSTER_TOKEN_FILE"
    --tls-cert "$TLS_DIR/scheduler.pem" --tls-key "$TLS_DIR/scheduler.key")
  if ((HA)); then
    # One sealing key for both: either may lead and must read what the other sealed.
    # Transactions of up to ETCD_MAX_TXN_OPS operations, as the members allow (see etcd_cmd).
    SCHEDULER_CMD+=(--store "etcd://$(printf '127.0.0.1:%s,' "${ETCD_CLIENT_PORTS[@]}" | sed 's/,$//')"
      --secret-key-file "$DATA_DIR/secret.key" --etcd-max-txn-ops "$ETCD_MAX_TXN_OPS")
  fi
}
api_cmd() { # INDEX
  API_CMD=("$BIN_DIR/berth-api"
    --listen "${API_ADDRS[$1]}"
    --metrics-listen "${API_METRICS[$1]}"
    --scheduler "$SCHEDULER_URL"
    --token-file "$TOKEN_FILE"
    --cluster-token-file "$CLUSTER_TOKEN_FILE"
    --tls-ca "$TLS_DIR/ca.pem")
}
agent_metrics() { # NODE_ID: its /metrics address (the agents' order in AGENTS)
  local i
  for i in "${!AGENTS[@]}"; do
    [[ "${AGENTS[$i]%% *}" == "$1" ]] && echo "127.0.0.1:$((AGENT_METRICS_BASE + i))" && return
  done
}
agent_cmd() { # NODE_ID REGION
  AGENT_CMD=("$BIN_DIR/berth-node-agent"
    --scheduler "$SCHEDULER_URL"
    --metrics-listen "$(agent_metrics "$1")"
    --node-id "$1"
    --region "$2"
    --memory-mib "${BERTH_AGENT_MEMORY_MIB:-4096}"
    --cpus 2
    --containerd-socket "$SOCK"
    --state-dir "$DATA_DIR/agent-$1"
    --registration-token-file "$DATA_DIR/agent-$1.registration-token"
    --tls-ca "$TLS_DIR/ca.pem")
}
etcd_cmd() { # INDEX
  local i="$1" cluster="" j
  for j in "${!ETCD_CLIENT_PORTS[@]}"; do
    cluster+="etcd-$((j + 1))=http://127.0.0.1:${ETCD_PEER_PORTS[$j]},"
  done
  local name="etcd-$((i + 1))" client="http://127.0.0.1:${ETCD_CLIENT_PORTS[$i]}"
  local peer="http://127.0.0.1:${ETCD_PEER_PORTS[$i]}"
  # `new` only matters the first time a member starts; with data it rejoins.
  ETCD_CMD=(/usr/bin/etcd --name "$name" --data-dir "$DATA_DIR/$name"
    --listen-client-urls "$client" --advertise-client-urls "$client"
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer"
    --initial-cluster "${cluster%,}" --initial-cluster-state new
    --max-txn-ops "$ETCD_MAX_TXN_OPS")
}
# etcd's default of 128 operations per transaction caps how many writes the scheduler's group
# commit can merge into one raft round trip; 1024 gave 2.4x the runs/s (docs/BENCHMARKS.md).
ETCD_MAX_TXN_OPS=1024

# Only what is down or changed is (re)started: the API and the agents reconnect to a
# restarted scheduler on their own (the API answers 503 meanwhile), so they keep running.
for name in "${RESTART[@]}"; do
  berth_stop_pidfile "$RUN_DIR/$name.pid"
done

if ((HA)); then
  for i in "${!ETCD_CLIENT_PORTS[@]}"; do
    etcd_cmd "$i"
    ensure_proc "etcd-$((i + 1))" "${ETCD_CMD[@]}"
  done
  for i in "${!ETCD_CLIENT_PORTS[@]}"; do
    berth_wait_tcp "127.0.0.1:${ETCD_CLIENT_PORTS[$i]}" 30 || berth_die "etcd-$((i + 1)) does not listen" "$LOG_DIR/etcd-$((i + 1)).log"
  done
fi

# Some scheduler listens: the only one, or the leader.
leader_up() {
  local a
  for a in "${SCHEDULER_ADDRS[@]}"; do
    berth_tcp_open "$a" && return 0
  done
  return 1
}
for i in "${!SCHEDULERS[@]}"; do
  mkdir -p "$DATA_DIR/${SCHEDULERS[$i]}"
  scheduler_cmd "$i"
  ensure_proc "${SCHEDULERS[$i]}" "${SCHEDULER_CMD[@]}"
  # The first one creates the sealing key (and leads); the second starts once both exist.
  for ((t = 0; t < 150; t++)); do
    leader_up && break
    check_alive "${SCHEDULERS[$i]}"
    sleep 0.2
  done
  leader_up || berth_die "no scheduler listens on ${SCHEDULER_ADDRS[*]} after 30s" "$LOG_DIR/${SCHEDULERS[$i]}.log"
done

for i in "${!APIS[@]}"; do
  api_cmd "$i"
  ensure_proc "${APIS[$i]}" "${API_CMD[@]}"
done
# ---------------------------------------------------------------- REST helpers

# api METHOD PATH [JSON] — sets HTTP_CODE and BODY.
HTTP_CODE=000
BODY=
api() {
  local method="$1" path="$2" data="${3:-}"
  local args=(-sS -o "$TMP/body" -w '%{http_code}' --max-time 10 -X "$method"
    -H "Authorization: Bearer $TOKEN" -H 'Accept: application/json')
  if [[ -n "$data" ]]; then
    args+=(-H 'Content-Type: application/json' --data "$data")
  fi
  : >"$TMP/body"
  HTTP_CODE="$(curl "${args[@]}" "$API_URL$path" 2>"$TMP/curl.err")" || HTTP_CODE=000
  BODY="$(cat "$TMP/body")"
}

api_die() { # MESSAGE [LOG...]
  local msg="$1"
  shift
  berth_die "$msg (HTTP $HTTP_CODE: ${BODY:-$(cat "$TMP/curl.err" 2>/dev/null)})" "$@"
}

API_LOG="$LOG_DIR/${APIS[0]}.log"
SCHEDULER_LOGS=()
for name in "${SCHEDULERS[@]}"; do
  SCHEDULER_LOGS+=("$LOG_DIR/$name.log")
done
AGENT_LOGS=()
for a in "${AGENTS[@]}"; do
  read -r node _ <<<"$a"
  AGENT_LOGS+=("$LOG_DIR/agent-$node.log")
done
ALL_LOGS=("${SCHEDULER_LOGS[@]}" "$API_LOG" "${AGENT_LOGS[@]}")

# ---------------------------------------------------------------- wait for the fleet

berth_log "waiting for the API on $API_URL"
for ((i = 0; i < 150; i++)); do
  api GET /v1/runners
  [[ "$HTTP_CODE" == 200 ]] && break
  [[ "$HTTP_CODE" == 401 || "$HTTP_CODE" == 403 ]] && api_die "the API rejects our token" "$API_LOG"
  check_alive "${APIS[0]}"
  sleep 0.2
done
[[ "$HTTP_CODE" == 200 ]] || api_die "the API did not answer GET /v1/runners with 200 within 30s" "$API_LOG"

# Each node enrolls once: a single-use registration token for its region, created through the
# API as an operator would (berthctl admin nodes token create), exchanged by the agent for its
# own credential (kept 0600 in its state directory); later starts use the credential.
for a in "${AGENTS[@]}"; do
  read -r node region <<<"$a"
  mkdir -p "$DATA_DIR/agent-$node"
  token_file="$DATA_DIR/agent-$node.registration-token"
  if [[ ! -s "$DATA_DIR/agent-$node/node.credential" ]]; then
    api POST /v1/admin/registration_tokens \
      "$(jq -nc --arg r "$region" --arg n "$node" '{region: $r, name: $n, single_use: true, expires_in_seconds: 600}')"
    [[ "$HTTP_CODE" == 201 ]] || api_die "could not create a registration token for $node" "$API_LOG"
    (umask 077 && jq -r .token <<<"$BODY" >"$token_file")
    # A node that enrolls again must not find its old agent still connected.
    berth_stop_pidfile "$RUN_DIR/agent-$node.pid"
  fi
  agent_cmd "$node" "$region"
  ensure_proc "agent-$node" "${AGENT_CMD[@]}"
done

berth_log "waiting for the nodes to register"
nodes_ok=0
for ((i = 0; i < 60; i++)); do
  api GET /v1/nodes
  if [[ "$HTTP_CODE" == 404 ]]; then
    sleep 2 # no node listing in this API version: give the agents a moment
    nodes_ok=1
    break
  fi
  nodes_missing=0
  for a in "${AGENTS[@]}"; do
    read -r node _ <<<"$a"
    check_alive "agent-$node"
    [[ "$HTTP_CODE" == 200 && "$BODY" == *"\"$node\""* ]] || nodes_missing=1
  done
  if ((nodes_missing == 0)); then
    nodes_ok=1
    break
  fi
  sleep 0.5
done
((nodes_ok)) || api_die "not all nodes registered within 30s (GET /v1/nodes)" "${AGENT_LOGS[@]}" "${SCHEDULER_LOGS[@]}"

# Every process says it is ready (/readyz on its metrics address: the leading scheduler its
# store, the APIs a scheduler, the agents their scheduler session and containerd). A standby
# scheduler is not ready by design (it does not lead), so only one scheduler must be.
ready_targets=("${API_METRICS[@]}")
for a in "${AGENTS[@]}"; do ready_targets+=("$(agent_metrics "${a%% *}")"); done
for target in "${ready_targets[@]}" scheduler; do
  ready=0
  for ((i = 0; i < 60; i++)); do
    if [[ "$target" == scheduler ]]; then
      for s in "${SCHEDULER_METRICS[@]}"; do
        curl -fsS -o /dev/null "http://$s/readyz" 2>/dev/null && ready=1
      done
    else
      curl -fsS -o /dev/null "http://$target/readyz" 2>/dev/null && ready=1
    fi
    ((ready)) && break
    sleep 0.5
  done
  if ((!ready)); then
    [[ "$target" == scheduler ]] && target="${SCHEDULER_METRICS[0]}"
    berth_die "http://$target/readyz is not ready after 30s: $(curl -sS "http://$target/readyz" 2>&1)"
  fi
done
berth_log "fleet is up: scheduler(s) ${SCHEDULER_ADDRS[*]}, API ${API_ADDRS[*]}, nodes ${AGENTS[*]%% *}"

# ---------------------------------------------------------------- demo

ha_usage() {
  ((HA)) || return 0
  cat <<EOF
  state      etcd $(printf '127.0.0.1:%s ' "${ETCD_CLIENT_PORTS[@]}")(logs etcd-N.log)
  failover   the leader is the scheduler that accepts connections; kill it and the other
             takes over (kill -9: within the 3 s lease; deploy/restart.sh scheduler-N: at once):
             kill -9 \$(cat $RUN_DIR/scheduler-1.pid)   # then GET /v1/nodes on either API
EOF
}

print_usage() {
  cat <<EOF

================================================================ Berth is running
  API        $(printf 'http://%s ' "${API_ADDRS[@]}")  (admin token in $TOKEN_FILE)
  dashboard  $(printf 'http://%s/ui/ ' "${API_ADDRS[@]}")  (log in with the admin token or an API key)
  scheduler  $SCHEDULER_URL   (gRPC)
  registry   http://$REGISTRY_ADDR   (image busybox:latest)
  nodes      fra-1 (region fra), ams-1 (region ams)
  metrics    $(printf 'http://%s/metrics ' "${SCHEDULER_METRICS[@]}" "${API_METRICS[@]}" "$(agent_metrics fra-1)" "$(agent_metrics ams-1)")
             (schedulers, APIs, agents fra-1 and ams-1; see docs/OPERATIONS.md)
  logs       $LOG_DIR/{$(printf '%s,' "${SCHEDULERS[@]}" "${APIS[@]}")agent-fra-1,agent-ams-1,containerd,registry}.log
$(ha_usage)

  . .berth/env        # sets BERTH_URL, BERTH_TOKEN, BERTH_REGISTRY

  curl -s -H "Authorization: Bearer \$BERTH_TOKEN" \$BERTH_URL/v1/runners | jq .
  curl -s -H "Authorization: Bearer \$BERTH_TOKEN" -H 'Content-Type: application/json' \\
       -d '{"name":"hi","image_name":"busybox","image_tag":"latest","run_command":"echo hi",
            "region":"ams","instance_type":"standard-s","timeout_seconds":60}' \\
       \$BERTH_URL/v1/runners | jq .                               # -> runner.id
  curl -s -H "Authorization: Bearer \$BERTH_TOKEN" -H 'Content-Type: application/json' -d '{}' \\
       \$BERTH_URL/v1/runners/RUNNER_ID/runs | jq .                # -> run.id
  curl -s -H "Authorization: Bearer \$BERTH_TOKEN" \$BERTH_URL/v1/runners/RUNNER_ID/runs/RUN_ID/logs | jq .

  a sandboxed runner (gVisor; both nodes run runsc if it works on this host):
  $BIN_DIR/berthctl runners create --name untrusted --image busybox --region fra \\
       --instance-type standard-s --isolation sandbox --command 'uname -r'
  $BIN_DIR/berthctl nodes list                          # RUNTIMES: runc,runsc

  a project's API key (the admin token acts in project "default"):
  $BIN_DIR/berthctl admin keys create --project demo   # prints the key once

  stop everything:   deploy/down.sh
================================================================
EOF
}

if [[ "${BERTH_SKIP_DEMO:-0}" == 1 ]]; then
  print_usage
  exit 0
fi

DEMO_NAME=demo-hello
demo_body() {
  jq -nc --arg name "$1" '{name: $name, image_name: "busybox", image_tag: "latest",
    run_command: "echo hello from berth; uname -a; echo done",
    region: "fra", instance_type: "standard-s", timeout_seconds: 60}'
}

# Reuse the demo runner an earlier up.sh created, so re-running adds runs, not runners.
api GET /v1/runners
RUNNER_ID=
if [[ "$HTTP_CODE" == 200 ]]; then
  RUNNER_ID="$(jq -r --arg n "$DEMO_NAME" '[.runners[]? | select(.name == $n) | .id][0] // empty' <<<"$BODY")"
fi
if [[ -n "$RUNNER_ID" ]]; then
  berth_log "demo: reusing runner $DEMO_NAME ($RUNNER_ID)"
else
  berth_log "demo: creating runner $DEMO_NAME"
  api POST /v1/runners "$(demo_body "$DEMO_NAME")"
  if [[ "$HTTP_CODE" == 201 ]]; then
    RUNNER_ID="$(jq -r '.runner.id // empty' <<<"$BODY")"
  fi
fi
[[ -n "$RUNNER_ID" ]] || api_die "could not create the demo runner (POST /v1/runners)" "$API_LOG" "${SCHEDULER_LOGS[@]}"

api POST "/v1/runners/$RUNNER_ID/runs" '{}'
RUN_ID=
if [[ "$HTTP_CODE" == 200 || "$HTTP_CODE" == 201 || "$HTTP_CODE" == 202 ]]; then
  RUN_ID="$(jq -r '.run.id // empty' <<<"$BODY")"
fi
[[ -n "$RUN_ID" ]] || api_die "could not start a run (POST /v1/runners/$RUNNER_ID/runs)" "$API_LOG" "${SCHEDULER_LOGS[@]}"
berth_log "demo: run $RUN_ID of runner $RUNNER_ID started; waiting for it to finish"

RUN_PATH="/v1/runners/$RUNNER_ID/runs/$RUN_ID"
STATUS=unknown
deadline=$((SECONDS + 60))
while ((SECONDS < deadline)); do
  api GET "$RUN_PATH"
  if [[ "$HTTP_CODE" == 200 ]]; then
    STATUS="$(jq -r '(.run.status // .status // "unknown") | ascii_downcase' <<<"$BODY")"
    case "$STATUS" in
      succeeded | failed | canceled | cancelled | timed_out | timedout | error) break ;;
    esac
  fi
  sleep 0.5
done
RUN_JSON="$BODY"

# Logs may trail the final status a little.
for ((i = 0; i < 6; i++)); do
  api GET "$RUN_PATH/logs"
  [[ "$HTTP_CODE" == 200 && "$(jq -r '(.logs // []) | length' <<<"$BODY")" != 0 ]] && break
  sleep 0.5
done
echo
echo "---- logs of run $RUN_ID ($STATUS) ----"
if [[ "$HTTP_CODE" == 200 ]]; then
  jq -r '(.logs // [])[] | "\(.ts // "")  \(.stream // "")\t\(.msg // "" | rtrimstr("\n"))"' <<<"$BODY"
else
  echo "(GET $RUN_PATH/logs answered HTTP $HTTP_CODE: $BODY)"
fi
echo "---- end of logs ----"

case "$STATUS" in
  succeeded)
    berth_log "demo run succeeded"
    ;;
  failed | canceled | cancelled | timed_out | timedout | error)
    BODY="$RUN_JSON"
    api_die "the demo run ended with status $STATUS" "${AGENT_LOGS[@]}"
    ;;
  *)
    BODY="$RUN_JSON"
    api_die "the demo run did not finish within 60s (last status: $STATUS)" "${ALL_LOGS[@]}"
    ;;
esac

print_usage
