#!/usr/bin/env bash
# Checks the Debian packages deploy/package.sh built, without installing them (issue #17).
#
# Usage: deploy/check-packages.sh DIR   (DIR holds berth-scheduler_*.deb, berth-api_*.deb,
#                                        berth-node-agent_*.deb and berthctl_*.deb)
#
# For each package:
#   - dpkg-deb --info: its dependencies (the `$auto` shared-library ones included), conffiles,
#     and maintainer scripts (present, executable, valid sh, enabling/starting the unit as meant);
#   - dpkg-deb --contents: exactly the expected files, with the expected modes, owned by root;
#   - its binary, extracted (dpkg-deb -x), runs (`--version`);
#   - each shipped config file (and the agent's example), as shipped and with every commented
#     `# key = value` example uncommented, is read by the package's own daemon: `--config FILE
#     --version` checks the TOML and the key names; the same settings given as flags before
#     `--version` check every value (clap parses a flag's value before it acts on --version).
# Then all four are extracted into one scratch root, beside a copy of this machine's own systemd
# units (the targets ours order against), and `systemd-analyze verify --root` checks each of our
# units there: syntax, unknown keys for this systemd (252 on bookworm), dependencies, and that
# ExecStart's binary is in the package. Unknown keys are only warnings to systemd-analyze (exit
# 0), so any line it prints about our units fails the check; lines about other units (a unit of
# this machine loaded as a dependency) are shown and ignored. `systemd-analyze security
# --offline` prints each unit's exposure score, for information. PID 1 need not be systemd.
#
# Prints one line per check and `N passed, N failed`; exits 1 when a check failed.
set -uo pipefail

DIR="${1:-}"
if [ -z "$DIR" ] || [ ! -d "$DIR" ]; then
  echo "usage: $0 DIR_WITH_DEBS" >&2
  exit 2
fi

PACKAGES=(berth-scheduler berth-api berth-node-agent berthctl)
UNITS=(berth-scheduler.service berth-api.service berth-node-agent.service)

# Regular files each package holds: "MODE PATH" (owner root/root, or 0/0, for every entry).
declare -A FILES DEPENDS RECOMMENDS SUGGESTS CONFFILES CONFIGS
FILES[berth-scheduler]="-rwxr-xr-x ./usr/bin/berth-scheduler
-rw-r--r-- ./etc/berth/scheduler.toml
-rw-r--r-- ./usr/lib/systemd/system/berth-scheduler.service
-rw-r--r-- ./usr/share/doc/berth-scheduler/copyright"
FILES[berth-api]="-rwxr-xr-x ./usr/bin/berth-api
-rw-r--r-- ./etc/berth/api.toml
-rw-r--r-- ./usr/lib/systemd/system/berth-api.service
-rw-r--r-- ./usr/share/doc/berth-api/copyright"
FILES[berth-node-agent]="-rwxr-xr-x ./usr/bin/berth-node-agent
-rw-r--r-- ./usr/lib/systemd/system/berth-node-agent.service
-rw-r--r-- ./usr/share/doc/berth-node-agent/copyright
-rw-r--r-- ./usr/share/doc/berth-node-agent/examples/node-agent.toml"
FILES[berthctl]="-rwxr-xr-x ./usr/bin/berthctl
-rw-r--r-- ./usr/share/doc/berthctl/copyright"
# Package names that must appear in each relation field (libc6: `$auto` ran dpkg-shlibdeps).
DEPENDS[berth-scheduler]="libc6 adduser"
DEPENDS[berth-api]="libc6 adduser"
DEPENDS[berth-node-agent]="libc6 containerd runc containernetworking-plugins iptables"
DEPENDS[berthctl]="libc6"
RECOMMENDS[berth-node-agent]="runsc"
SUGGESTS[berth-scheduler]="etcd-server"
CONFFILES[berth-scheduler]="/etc/berth/scheduler.toml"
CONFFILES[berth-api]="/etc/berth/api.toml"
# Config files in the package, as "DAEMON_BINARY PATH".
CONFIGS[berth-scheduler]="berth-scheduler ./etc/berth/scheduler.toml"
CONFIGS[berth-api]="berth-api ./etc/berth/api.toml"
CONFIGS[berth-node-agent]="berth-node-agent ./usr/share/doc/berth-node-agent/examples/node-agent.toml"

WORK="$(mktemp -d /tmp/berth-check-packages.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/root"
mkdir -p "$ROOT"

passed=0
failed=0
ok() { echo "ok    $*"; passed=$((passed + 1)); }
fail() { echo "FAIL  $*"; failed=$((failed + 1)); }
info() { echo "info  $*"; }
indent() { sed 's/^/        /'; }

# The package names in a relation field ("a (>= 1), b | c" -> "a b c").
names() { tr ',|' '\n\n' | sed 's/(.*)//; s/\[.*\]//; s/:.*//; s/[[:space:]]//g' | grep -v '^$'; }

# A config file's settings as the daemon's flags, NUL-separated (`max_runs = 8` -> --max-runs 8;
# a list repeats the flag; `true` is the bare switch). A key is the setting's id, which is not
# always its flag (`insecure_registries` is `--insecure-registry`): the daemon's --help (given
# as $2) maps them, as clap names a value after its id (`--insecure-registry
# <INSECURE_REGISTRIES>`).
flags_of() {
  python3 - "$1" "$2" <<'PY'
import re, sys, tomllib
with open(sys.argv[1], "rb") as f:
    table = tomllib.load(f)
with open(sys.argv[2]) as f:
    flag_of = {m.group(2).lower(): m.group(1)
               for m in re.finditer(r"--([a-z0-9-]+) <([A-Z0-9_]+)>", f.read())}
out = []
for key, value in table.items():
    flag = "--" + flag_of.get(key.replace("-", "_"), key.replace("_", "-"))
    if isinstance(value, bool):
        out += [flag] if value else []
    elif isinstance(value, list):
        for item in value:
            out += [flag, str(item)]
    else:
        out += [flag, str(value)]
sys.stdout.write("\0".join(out))
PY
}

check_relations() { # pkg deb field expected-names
  local pkg="$1" deb="$2" field="$3" want="$4" have missing=""
  have="$(dpkg-deb --field "$deb" "$field" | names)"
  for n in $want; do
    grep -qx "$n" <<<"$have" || missing+=" $n"
  done
  if [ -z "$missing" ]; then
    ok "$pkg: $field: $(dpkg-deb --field "$deb" "$field")"
  else
    fail "$pkg: $field lacks$missing (has: $(dpkg-deb --field "$deb" "$field"))"
  fi
}

for pkg in "${PACKAGES[@]}"; do
  shopt -s nullglob
  debs=("$DIR/${pkg}"_*.deb)
  shopt -u nullglob
  if [ "${#debs[@]}" -ne 1 ]; then
    fail "$pkg: expected one ${pkg}_*.deb in $DIR, found ${#debs[@]}"
    continue
  fi
  deb="${debs[0]}"
  info "$pkg: $(basename "$deb"), $(stat -c %s "$deb") bytes"

  # Control fields.
  name="$(dpkg-deb --field "$deb" Package)"
  [ "$name" = "$pkg" ] && ok "$pkg: Package: $name" || fail "$pkg: Package is '$name'"
  check_relations "$pkg" "$deb" Depends "${DEPENDS[$pkg]}"
  [ -n "${RECOMMENDS[$pkg]:-}" ] && check_relations "$pkg" "$deb" Recommends "${RECOMMENDS[$pkg]}"
  [ -n "${SUGGESTS[$pkg]:-}" ] && check_relations "$pkg" "$deb" Suggests "${SUGGESTS[$pkg]}"
  # Both come from the crate's [package] (outside the packaging metadata): report, don't fail.
  desc="$(dpkg-deb --field "$deb" Description | head -n 1)"
  case "$desc" in
    "[generated from Rust crate"*) info "$pkg: no [package] description in the crate's Cargo.toml: Description is '$desc'" ;;
  esac

  # Contents: exactly the expected regular files, modes, all owned by root.
  dpkg-deb --contents "$deb" >"$WORK/$pkg.contents"
  bad_owner="$(awk '$2 != "root/root" && $2 != "0/0"' "$WORK/$pkg.contents")"
  [ -z "$bad_owner" ] && ok "$pkg: every entry owned by root" \
    || { fail "$pkg: entries not owned by root:"; indent <<<"$bad_owner"; }
  bad_dirs="$(awk '$1 ~ /^d/ && $1 != "drwxr-xr-x"' "$WORK/$pkg.contents")"
  [ -z "$bad_dirs" ] && ok "$pkg: directories 0755" \
    || { fail "$pkg: directories with other modes:"; indent <<<"$bad_dirs"; }
  have_files="$(awk '$1 !~ /^d/ {print $1, $6}' "$WORK/$pkg.contents" | sort)"
  want_files="$(sort <<<"${FILES[$pkg]}")"
  if [ "$have_files" = "$want_files" ]; then
    ok "$pkg: files and modes:"
    indent <<<"$have_files"
  else
    fail "$pkg: files differ from the expected ones (< expected, > in the package):"
    diff <(echo "$want_files") <(echo "$have_files") | grep '^[<>]' | indent
  fi

  # Conffiles.
  mkdir -p "$WORK/control/$pkg"
  dpkg-deb --control "$deb" "$WORK/control/$pkg"
  have_conf="$(sort "$WORK/control/$pkg/conffiles" 2>/dev/null)"
  want_conf="$(tr ' ' '\n' <<<"${CONFFILES[$pkg]:-}" | grep -v '^$' | sort)"
  [ "$have_conf" = "$want_conf" ] && ok "$pkg: conffiles: ${have_conf:-none}" \
    || fail "$pkg: conffiles are '${have_conf//$'\n'/ }', expected '${want_conf//$'\n'/ }'"

  # Maintainer scripts: executable, valid sh, and the systemd snippets meant for this unit.
  while read -r mode _ _ _ _ path; do
    case "$path" in
      ./preinst|./postinst|./prerm|./postrm)
        [ "$mode" = "-rwxr-xr-x" ] && ok "$pkg: ${path#./} is 0755" || fail "$pkg: ${path#./} has mode $mode"
        sh -n "$WORK/control/$pkg/${path#./}" && ok "$pkg: ${path#./} parses (sh -n)" \
          || fail "$pkg: ${path#./} does not parse"
        ;;
    esac
  done < <(dpkg-deb --ctrl-tarfile "$deb" | tar -tvf -)
  if [ "$pkg" != berthctl ]; then
    unit="$pkg.service"
    postinst="$WORK/control/$pkg/postinst"
    for script in postinst prerm postrm; do
      [ -f "$WORK/control/$pkg/$script" ] || fail "$pkg: no $script"
    done
    grep -q "deb-systemd-helper enable $unit" "$postinst" 2>/dev/null \
      && ok "$pkg: postinst enables $unit" || fail "$pkg: postinst does not enable $unit"
    if [ "$pkg" = berth-scheduler ]; then
      grep -q "_dh_action=start" "$postinst" && grep -q "deb-systemd-invoke \$_dh_action $unit" "$postinst" \
        && ok "$pkg: postinst starts $unit (when systemd runs)" || fail "$pkg: postinst does not start $unit"
    else
      ! grep -q "_dh_action=start" "$postinst" && grep -q "deb-systemd-invoke try-restart $unit" "$postinst" \
        && ok "$pkg: postinst does not start $unit, restarts it on upgrade only if running" \
        || fail "$pkg: postinst starts $unit, or does not try-restart it"
    fi
    case "$pkg" in
      berth-scheduler|berth-api)
        grep -q "adduser --system" "$postinst" && ok "$pkg: postinst creates the berth system user" \
          || fail "$pkg: postinst does not create the berth user" ;;
    esac
  fi

  # The binary runs, and reads the shipped config file.
  dpkg-deb -x "$deb" "$ROOT"
  bin="$ROOT/usr/bin/$pkg"
  if version="$(env -i PATH=/usr/bin:/bin "$bin" --version 2>&1)"; then
    ok "$pkg: /usr/bin/$pkg --version: $version"
  else
    fail "$pkg: /usr/bin/$pkg --version failed: $version"
  fi
  if [ -n "${CONFIGS[$pkg]:-}" ]; then
    read -r daemon conf <<<"${CONFIGS[$pkg]}"
    full="$WORK/$pkg.all-examples.toml"
    sed -E 's/^# ([a-z_]+ = )/\1/' "$ROOT/$conf" >"$full"
    if env -i PATH=/usr/bin:/bin "$ROOT/usr/bin/$daemon" --help 2>/dev/null | grep -q -- '--config'; then
      for f in "$ROOT/$conf" "$full"; do
        what="${conf#.}"; [ "$f" = "$full" ] && what="${conf#.} with its examples uncommented"
        if out="$(env -i PATH=/usr/bin:/bin "$ROOT/usr/bin/$daemon" --config "$f" --version 2>&1)"; then
          ok "$pkg: $daemon reads $what"
        else
          fail "$pkg: $daemon rejects $what:"; indent <<<"$out"
        fi
      done
      if command -v python3 >/dev/null && python3 -c 'import tomllib' 2>/dev/null; then
        env -i PATH=/usr/bin:/bin "$ROOT/usr/bin/$daemon" --help >"$WORK/$daemon.help" 2>&1
        mapfile -d '' flags < <(flags_of "$full" "$WORK/$daemon.help")
        if out="$(env -i PATH=/usr/bin:/bin "$ROOT/usr/bin/$daemon" "${flags[@]}" --version 2>&1)"; then
          ok "$pkg: $daemon takes every value of ${conf#.} (examples included) as flags"
        else
          fail "$pkg: $daemon rejects a value of ${conf#.} (examples included):"; indent <<<"$out"
        fi
      else
        info "$pkg: SKIPPED checking the values of ${conf#.}: no python3 with tomllib (3.11+)"
      fi
    else
      info "$pkg: SKIPPED reading ${conf#.}: this $daemon has no --config (built before config files)"
    fi
  fi
done

# systemd units, in one root with the four packages and this machine's systemd units.
if ! command -v systemd-analyze >/dev/null; then
  fail "systemd-analyze is not installed (apt-get install systemd)"
else
  info "$(systemd-analyze --version | head -n 1) (PID 1 here: $(ps -o comm= -p 1))"
  mkdir -p "$ROOT/usr/lib/systemd/system"
  # -n: never over our own units (this machine may have the packages installed).
  cp -an /lib/systemd/system/. "$ROOT/usr/lib/systemd/system/"
  for unit in "${UNITS[@]}"; do
    if [ ! -f "$ROOT/usr/lib/systemd/system/$unit" ]; then
      fail "$unit: not in any package"
      continue
    fi
    out="$(systemd-analyze verify --root="$ROOT" "$unit" 2>&1)"
    rc=$?
    ours="$(grep -i 'berth' <<<"$out")"
    others="$(grep -vi 'berth' <<<"$out" | grep -v '^$')"
    if [ "$rc" -eq 0 ] && [ -z "$ours" ]; then
      ok "$unit: systemd-analyze verify: no warnings"
    else
      fail "$unit: systemd-analyze verify (exit $rc):"
      indent <<<"${ours:-$out}"
    fi
    [ -n "$others" ] && { info "$unit: ignored, about other units:"; indent <<<"$others"; }
    score="$(systemd-analyze security --offline=true --root="$ROOT" --no-pager "$unit" 2>&1 \
      | grep 'Overall exposure level' | sed 's/.*: //')"
    info "$unit: systemd-analyze security exposure: ${score:-not computed}"
  done
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
