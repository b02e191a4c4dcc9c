# shellcheck shell=bash
# Berth deploy helpers. Source this file from bash:  . deploy/lib.sh
#
# Every berth_start_* function is idempotent: it first checks the pid file
# (process alive and still the expected program) and whether the service
# answers, and reuses a running instance instead of starting a second one.
#
# Layout of a DATA_DIR (e.g. /var/lib/berth/fleet or /var/lib/berth/test):
#   DATA_DIR/containerd/{config.toml,containerd.sock,containerd.sock.ttrpc,debug.sock,root,state}
#   DATA_DIR/registry/               registry blob storage (+ config.yml)
#   DATA_DIR/logs/*.log              one log per daemon
#   DATA_DIR/run/*.pid               one pid file per daemon

if [[ -n "${BERTH_LIB_SOURCED:-}" ]]; then
  return 0
fi
BERTH_LIB_SOURCED=1

BERTH_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export BERTH_REPO

# cargo is installed by rustup under ~/.cargo/bin; make sure it is found even
# when the caller's PATH lacks it (e.g. a minimal CI environment).
if ! command -v cargo >/dev/null 2>&1 && [[ -x "${HOME:-/root}/.cargo/bin/cargo" ]]; then
  PATH="${HOME:-/root}/.cargo/bin:$PATH"
  export PATH
fi
# The fleets these scripts start (up.sh, test.sh) are configured by their command lines alone:
# a config file of an installed Berth (/etc/berth/<daemon>.toml) must not add settings to them.
export BERTH_SCHEDULER_CONFIG=/dev/null BERTH_API_CONFIG=/dev/null BERTH_NODE_AGENT_CONFIG=/dev/null

# Debian packages the scripts and the build need. The node agent runs the CNI plugins of
# containernetworking-plugins (bridge, host-local, loopback) for each run's network,
# iptables for the host isolation rules, and runsc (gVisor) for sandboxed runs; the
# end-to-end tests use iproute2's `ip netns`, and deploy/format-images.py compresses its
# zstd test image with the `zstd` tool; the package checks use systemd's `systemd-analyze`.
BERTH_PACKAGES=(
  containerd runc runsc docker-registry umoci skopeo busybox-static zstd
  containernetworking-plugins iptables iproute2
  protobuf-compiler libprotobuf-dev etcd-server etcd-client jq curl pkg-config gcc libc6-dev
  ca-certificates apache2-utils python3 python3-venv systemd
)

BERTH_OCI_PATH_ENV="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BERTH_MANIFEST_ACCEPT="application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json"

# ---------------------------------------------------------------- messages

berth_log() {
  printf '[berth] %s\n' "$*" >&2
}

berth_warn() {
  printf '[berth] WARNING: %s\n' "$*" >&2
}

# berth_show_log FILE [LINES] — print the tail of a log file to stderr.
berth_show_log() {
  local file="$1" lines="${2:-40}"
  if [[ -s "$file" ]]; then
    printf '[berth] ---- last %s lines of %s ----\n' "$lines" "$file" >&2
    tail -n "$lines" "$file" >&2 || true
    printf '[berth] ---- end of %s ----\n' "$file" >&2
  else
    printf '[berth] (log %s is empty or missing)\n' "$file" >&2
  fi
}

# berth_die MESSAGE [LOGFILE...] — print an error, the tails of the given
# logs, and exit 1.
berth_die() {
  local msg="$1"
  shift
  printf '[berth] ERROR: %s\n' "$msg" >&2
  local f
  for f in "$@"; do
    berth_show_log "$f"
  done
  exit 1
}

# ---------------------------------------------------------------- packages

# berth_missing_packages — print the names of BERTH_PACKAGES not installed.
berth_missing_packages() {
  local pkg status
  for pkg in "${BERTH_PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    if [[ "$status" != "installed" ]]; then
      printf '%s\n' "$pkg"
    fi
  done
}

# berth_install_packages — apt-get install the missing packages (one
# apt-get update first). Does nothing, and touches no network, when all are
# already installed. Services shipped by the packages (docker-registry's
# init script would grab port 5000) are kept from starting.
berth_install_packages() {
  local missing=()
  mapfile -t missing < <(berth_missing_packages)
  if ((${#missing[@]} == 0)); then
    berth_log "packages: all present"
  else
    berth_log "packages: installing ${missing[*]}"
    if [[ "$(id -u)" != 0 ]]; then
      berth_die "installing packages needs root (missing: ${missing[*]})"
    fi
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e "$policy" ]]; then
      printf '#!/bin/sh\n# temporary, written by berth deploy/lib.sh\nexit 101\n' >"$policy"
      chmod 755 "$policy"
      made_policy=1
    fi
    local rc=0
    {
      DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    } </dev/null || rc=$?
    if ((made_policy)); then
      rm -f "$policy"
    fi
    if ((rc != 0)); then
      berth_die "apt-get failed (exit $rc) installing: ${missing[*]}"
    fi
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    berth_die "cargo not found: install the Rust toolchain (rustup) first"
  fi
}

# ---------------------------------------------------------------- processes

# berth_pid_alive FILE [NAME] — true if FILE names a live process (not a
# zombie) whose command line contains NAME (when given) or which is still our
# launcher about to exec it.
berth_pid_alive() {
  local file="$1" name="${2:-}" pid state cmdline
  [[ -f "$file" ]] || return 1
  pid="$(head -n1 "$file" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  state="$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)"
  [[ "$state" != Z && -n "$state" ]] || return 1
  if [[ -n "$name" ]]; then
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ "$cmdline" == *"$name"* || "$cmdline" == berth-launch* ]] || return 1
  fi
  return 0
}

# berth_spawn PIDFILE LOGFILE CMD [ARGS...] — start CMD in the background in
# its own session, stdin from /dev/null, stdout+stderr appended to LOGFILE,
# and its pid written to PIDFILE (by the process itself, right before exec,
# so the pid is right whether or not setsid had to fork).
berth_spawn() {
  local pidfile="$1" logfile="$2"
  shift 2
  mkdir -p "$(dirname "$pidfile")" "$(dirname "$logfile")"
  rm -f "$pidfile"
  # Log the command line, with the value of any --token masked.
  local shown=() a prev=
  for a in "$@"; do
    if [[ "$prev" == --token ]]; then shown+=("***"); else shown+=("$a"); fi
    prev="$a"
  done
  printf '==== %s starting: %s\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "${shown[*]}" >>"$logfile"
  # shellcheck disable=SC2016  # $1/$@ are expanded by the inner bash
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' berth-launch "$pidfile" "$@" \
    </dev/null >>"$logfile" 2>&1 &
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -s "$pidfile" ]] && return 0
    sleep 0.1
  done
  berth_die "could not start $1 (no pid file $pidfile)" "$logfile"
}

# berth_stop_pidfile FILE [TIMEOUT_S] — SIGTERM the process in FILE, wait up
# to TIMEOUT_S (default 10) seconds, then SIGKILL; remove FILE. Quiet and
# successful when nothing runs.
berth_stop_pidfile() {
  local file="$1" timeout="${2:-10}" pid i
  if ! berth_pid_alive "$file"; then
    rm -f "$file"
    return 0
  fi
  pid="$(head -n1 "$file")"
  berth_log "stopping $(basename "$file" .pid) (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < timeout * 10; i++)); do
    berth_pid_alive "$file" || break
    sleep 0.1
  done
  if berth_pid_alive "$file"; then
    berth_warn "$(basename "$file" .pid) (pid $pid) did not stop in ${timeout}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
  fi
  rm -f "$file"
}

# berth_tcp_open HOST:PORT — true if something accepts TCP connections there.
berth_tcp_open() {
  local host="${1%:*}" port="${1##*:}"
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# berth_wait_tcp HOST:PORT TIMEOUT_S — wait until the port accepts connections.
berth_wait_tcp() {
  local addr="$1" timeout="$2" i
  for ((i = 0; i < timeout * 5; i++)); do
    berth_tcp_open "$addr" && return 0
    sleep 0.2
  done
  return 1
}

# ---------------------------------------------------------------- containerd

# berth_containerd_socket DATA_DIR — print the gRPC socket path.
berth_containerd_socket() {
  printf '%s\n' "$1/containerd/containerd.sock"
}

# berth_containerd_ping SOCKET — true if containerd answers on SOCKET.
berth_containerd_ping() {
  [[ -S "$1" ]] && timeout 5 ctr --address "$1" version >/dev/null 2>&1
}

berth_write_containerd_config() {
  local dir="$1/containerd"
  mkdir -p "$dir/root" "$dir/state" "$dir/opt"
  cat >"$dir/config.toml.new" <<EOF
# Written by berth deploy/lib.sh — regenerated on every start.
version = 2
root = "$dir/root"
state = "$dir/state"
oom_score = 0
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "$dir/containerd.sock"
  tcp_address = ""

[ttrpc]
  address = "$dir/containerd.sock.ttrpc"

[debug]
  address = "$dir/debug.sock"
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"
EOF
  mv -f "$dir/config.toml.new" "$dir/config.toml"
}

# berth_start_containerd DATA_DIR — start (or reuse) a containerd instance
# whose root, state, sockets and config all live under DATA_DIR/containerd.
# Sets and exports BERTH_CONTAINERD_SOCKET and prints the socket path.
berth_start_containerd() {
  local data="$1"
  local sock pidfile logfile i
  sock="$(berth_containerd_socket "$data")"
  pidfile="$data/run/containerd.pid"
  logfile="$data/logs/containerd.log"
  mkdir -p "$data/run" "$data/logs"

  if berth_pid_alive "$pidfile" containerd && berth_containerd_ping "$sock"; then
    berth_log "containerd already running (pid $(head -n1 "$pidfile")), socket $sock"
  else
    if berth_containerd_ping "$sock"; then
      berth_die "a containerd not started by these scripts already answers on $sock; stop it first"
    fi
    berth_stop_pidfile "$pidfile"
    case "$(stat -f -c %T "$data" 2>/dev/null || true)" in
      overlayfs | overlay)
        berth_die "$data is on overlayfs; containerd's snapshots need ext4/xfs (use a dir under /var/lib)"
        ;;
    esac
    berth_write_containerd_config "$data"
    berth_log "starting containerd (log $logfile)"
    berth_spawn "$pidfile" "$logfile" containerd --config "$data/containerd/config.toml"
    for ((i = 0; i < 150; i++)); do
      berth_containerd_ping "$sock" && break
      # Alive by pid alone: the process was spawned a moment ago, so its pid cannot have been
      # reused, and while it execs its /proc cmdline can read empty (the name check then failed
      # and this killed a containerd that was starting normally).
      berth_pid_alive "$pidfile" || berth_die "containerd exited during start-up" "$logfile"
      sleep 0.2
    done
    berth_containerd_ping "$sock" || berth_die "containerd did not answer on $sock within 30s" "$logfile"
    berth_log "containerd ready (pid $(head -n1 "$pidfile")), socket $sock"
  fi
  BERTH_CONTAINERD_SOCKET="$sock"
  export BERTH_CONTAINERD_SOCKET
  printf '%s\n' "$sock"
}

# berth_containerd_shim_pids SOCKET — pids of containerd-shim processes that
# belong to the containerd listening on SOCKET (their "-address SOCKET").
berth_containerd_shim_pids() {
  local sock="$1" p args i
  for p in /proc/[0-9]*; do
    [[ -r "$p/cmdline" ]] || continue
    mapfile -d '' -t args <"$p/cmdline" 2>/dev/null || continue
    ((${#args[@]} > 0)) || continue
    [[ "${args[0]}" == *containerd-shim* ]] || continue
    for ((i = 0; i + 1 < ${#args[@]}; i++)); do
      if [[ "${args[i]}" == "-address" && "${args[i + 1]}" == "$sock" ]]; then
        printf '%s\n' "${p#/proc/}"
        break
      fi
    done
  done
}

# berth_kill_containerd_tasks SOCKET — SIGKILL and delete every task in
# every namespace of that containerd (containers' metadata is kept).
berth_kill_containerd_tasks() {
  local sock="$1" ns task
  berth_containerd_ping "$sock" || return 0
  while read -r ns; do
    [[ -n "$ns" ]] || continue
    while read -r task; do
      [[ -n "$task" ]] || continue
      timeout 10 ctr --address "$sock" -n "$ns" tasks kill -a -s SIGKILL "$task" >/dev/null 2>&1 || true
    done < <(timeout 10 ctr --address "$sock" -n "$ns" tasks ls -q 2>/dev/null || true)
    while read -r task; do
      [[ -n "$task" ]] || continue
      timeout 10 ctr --address "$sock" -n "$ns" tasks delete -f "$task" >/dev/null 2>&1 || true
    done < <(timeout 10 ctr --address "$sock" -n "$ns" tasks ls -q 2>/dev/null || true)
  done < <(timeout 10 ctr --address "$sock" namespaces ls -q 2>/dev/null || true)
}

# berth_stop_containerd DATA_DIR — kill the instance's running tasks, stop
# containerd, then kill any shim of that instance still running.
berth_stop_containerd() {
  local data="$1" sock pid
  sock="$(berth_containerd_socket "$data")"
  if berth_pid_alive "$data/run/containerd.pid" containerd; then
    berth_kill_containerd_tasks "$sock"
  fi
  berth_stop_pidfile "$data/run/containerd.pid" 15
  local pids=()
  mapfile -t pids < <(berth_containerd_shim_pids "$sock")
  if ((${#pids[@]} > 0)); then
    berth_log "killing ${#pids[@]} leftover containerd shim(s) of $sock"
    for pid in "${pids[@]}"; do
      kill -KILL "$pid" 2>/dev/null || true
    done
  fi
}

# berth_sweep_test_networks — release the run networks (namespaces, masquerading
# rules, addresses) that earlier test runs' killed agents left behind; see
# deploy/sweep-test-networks.py. Leaves running tests and deploy/up.sh fleets alone.
berth_sweep_test_networks() {
  local out
  out="$(python3 "$BERTH_REPO/deploy/sweep-test-networks.py" 2>&1)" || berth_warn "sweeping test networks failed: $out"
  [[ -z "$out" ]] || berth_log "$out"
}

# ---------------------------------------------------------------- registry

# berth_registry_ping ADDR — true if a registry answers GET /v2/ at ADDR.
# berth_registry_ping ADDR — true when a registry answers /v2/ (200, or 401 when
# it requires credentials).
berth_registry_ping() {
  local code
  code="$(curl -sS --max-time 3 -o /dev/null -w '%{http_code}' "http://$1/v2/" 2>/dev/null || true)"
  [[ "$code" == 200 || "$code" == 401 ]]
}

# berth_start_registry DATA_DIR ADDR [NAME [HTPASSWD_FILE]] — start (or reuse) a
# plain-HTTP docker-registry on ADDR (HOST:PORT or just PORT; host defaults to
# 127.0.0.1) with filesystem storage under DATA_DIR/NAME (NAME defaults to
# "registry"). With HTPASSWD_FILE it requires those credentials (basic auth).
berth_start_registry() {
  local data="$1" addr="$2" name="${3:-registry}" htpasswd="${4:-}" pidfile logfile conf i auth=""
  [[ "$addr" == *:* ]] || addr="127.0.0.1:$addr"
  pidfile="$data/run/$name.pid"
  logfile="$data/logs/$name.log"
  conf="$data/$name/config.yml"
  mkdir -p "$data/run" "$data/logs" "$data/$name/storage"
  if [[ -n "$htpasswd" ]]; then
    auth="auth:
  htpasswd:
    realm: berth-test
    path: $htpasswd"
  fi

  if berth_pid_alive "$pidfile" docker-registry && berth_registry_ping "$addr"; then
    berth_log "registry already running (pid $(head -n1 "$pidfile")) on http://$addr"
    return 0
  fi
  berth_stop_pidfile "$pidfile"
  if berth_tcp_open "$addr"; then
    berth_die "port $addr is already taken by another process (not this instance's registry)"
  fi
  cat >"$conf" <<EOF
# Written by berth deploy/lib.sh — regenerated on every start.
version: 0.1
log:
  level: info
  fields:
    service: registry
$auth
storage:
  filesystem:
    rootdirectory: $data/$name/storage
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: $addr
  headers:
    X-Content-Type-Options: [nosniff]
EOF
  berth_log "starting registry on http://$addr (log $logfile)"
  berth_spawn "$pidfile" "$logfile" /usr/bin/docker-registry serve "$conf"
  for ((i = 0; i < 100; i++)); do
    berth_registry_ping "$addr" && break
    berth_pid_alive "$pidfile" || berth_die "registry exited during start-up" "$logfile"
    sleep 0.2
  done
  berth_registry_ping "$addr" || berth_die "registry did not answer on http://$addr/v2/ within 20s" "$logfile"
  berth_log "registry ready (pid $(head -n1 "$pidfile")) on http://$addr"
}

# berth_stop_registry DATA_DIR [NAME]
berth_stop_registry() {
  berth_stop_pidfile "$1/run/${2:-registry}.pid"
}

# berth_start_private_registry DATA_DIR ADDR USER PASSWORD FROM_ADDR — a registry
# on ADDR that requires USER/PASSWORD (htpasswd, bcrypt), holding
# private/busybox:latest copied from the plain registry at FROM_ADDR.
berth_start_private_registry() {
  local data="$1" addr="$2" user="$3" pass="$4" from="$5" htpasswd
  htpasswd="$data/private-registry.htpasswd"
  mkdir -p "$data"
  htpasswd -Bbn "$user" "$pass" >"$htpasswd"
  berth_start_registry "$data" "$addr" private-registry "$htpasswd"
  if curl -fsS --max-time 5 -o /dev/null -u "$user:$pass" -H "Accept: $BERTH_MANIFEST_ACCEPT" \
    "http://$addr/v2/private/busybox/manifests/latest" 2>/dev/null; then
    berth_log "image $addr/private/busybox:latest already in the private registry"
    return 0
  fi
  skopeo --insecure-policy copy --quiet --src-tls-verify=false --dest-tls-verify=false \
    --dest-creds "$user:$pass" \
    "docker://$from/busybox:latest" "docker://$addr/private/busybox:latest" ||
    berth_die "skopeo could not push to the private registry $addr"
  berth_log "pushed $addr/private/busybox:latest (credentials required)"
}

# ---------------------------------------------------------------- image

# berth_image_exists ADDR REPO TAG — true if the registry has that manifest.
berth_image_exists() {
  curl -fsS --max-time 5 -o /dev/null -H "Accept: $BERTH_MANIFEST_ACCEPT" \
    "http://$1/v2/$2/manifests/$3" 2>/dev/null
}

berth_go_arch() {
  case "$(uname -m)" in
    x86_64) echo amd64 ;;
    aarch64 | arm64) echo arm64 ;;
    armv7l) echo arm ;;
    *) uname -m ;;
  esac
}

# berth_build_busybox_image ADDR — build an OCI image busybox:latest from
# the host's busybox-static (/bin/busybox plus one symlink per applet) and
# push it to the plain-HTTP registry at ADDR. Skipped when it is there.
# Runs in a subshell so its temp dir is always removed.
berth_build_busybox_image() (
  set -euo pipefail
  addr="$1"
  [[ "$addr" == *:* ]] || addr="127.0.0.1:$addr"
  if berth_image_exists "$addr" busybox latest; then
    berth_log "image $addr/busybox:latest already in the registry"
    exit 0
  fi
  busybox=/bin/busybox
  [[ -x "$busybox" ]] || berth_die "$busybox missing (package busybox-static)"

  tmp="$(mktemp -d /var/tmp/berth-image.XXXXXX)"
  trap 'rm -rf "$tmp"' EXIT
  berth_log "building image $addr/busybox:latest in $tmp"

  rootfs="$tmp/rootfs"
  mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp" "$rootfs/root" \
    "$rootfs/proc" "$rootfs/sys" "$rootfs/dev"
  chmod 1777 "$rootfs/tmp"
  chmod 700 "$rootfs/root"
  cp "$busybox" "$rootfs/bin/busybox"
  chmod 755 "$rootfs/bin/busybox"
  n=0
  while read -r applet; do
    [[ -n "$applet" && "$applet" != busybox && "$applet" != */* ]] || continue
    ln -sf busybox "$rootfs/bin/$applet"
    n=$((n + 1))
  done < <("$busybox" --list)
  for applet in sh echo sleep cat ls env printf true false yes head seq dd grep; do
    [[ -L "$rootfs/bin/$applet" ]] || berth_die "busybox has no '$applet' applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
  printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"

  layout="$tmp/oci"
  {
    umoci init --layout "$layout"
    umoci new --image "$layout:latest"
    umoci insert --image "$layout:latest" "$rootfs" /
    umoci config --image "$layout:latest" \
      --os linux --architecture "$(berth_go_arch)" \
      --config.cmd sh \
      --config.env "$BERTH_OCI_PATH_ENV" \
      --config.workingdir / \
      --author berth
    umoci gc --layout "$layout"
  } >"$tmp/umoci.log" 2>&1 || berth_die "umoci failed building the busybox image" "$tmp/umoci.log"

  skopeo --insecure-policy copy --quiet --dest-tls-verify=false \
    "oci:$layout:latest" "docker://$addr/busybox:latest" >"$tmp/skopeo.log" 2>&1 ||
    berth_die "skopeo could not push to $addr" "$tmp/skopeo.log"
  berth_image_exists "$addr" busybox latest || berth_die "pushed image not visible at http://$addr/v2/busybox/manifests/latest"
  berth_log "pushed $addr/busybox:latest ($n applets)"
)

# ---------------------------------------------------------------- build

# berth_target_dir — the cargo target dir (CARGO_TARGET_DIR or REPO/target).
berth_target_dir() {
  printf '%s\n' "${CARGO_TARGET_DIR:-$BERTH_REPO/target}"
}

# berth_build [release|debug] — build all binaries of the workspace.
berth_build() {
  local profile="${1:-release}"
  local args=(build --workspace --bins)
  [[ "$profile" == release ]] && args+=(--release)
  berth_log "cargo ${args[*]} (target dir $(berth_target_dir))"
  (cd "$BERTH_REPO" && cargo "${args[@]}") || berth_die "cargo ${args[*]} failed"
}

# berth_bin_dir [release|debug] — where berth_build puts the binaries.
berth_bin_dir() {
  printf '%s/%s\n' "$(berth_target_dir)" "${1:-release}"
}
