#!/usr/bin/env python3
"""Releases what test fleets' node agents left of their runs' networks.

The end-to-end tests kill their agents (SIGKILL) when a test ends, often with runs still
attached; an agent released those networks when it started again under the same node id,
but a test's node ids (`e<test pid>x<n>-<region>`) are never used again. On a machine that
runs the suite many times the leftovers pile up (hundreds of namespaces, veths, NAT chains
and addresses) and slow every later run's network attach. This removes, for node ids of
those forms whose test process is gone:
  - the network namespaces under /run/berth/netns/<node id>/ (their veths go with them);
and then, for every id that has no namespace left under /run/berth/netns:
  - the bridge plugin's masquerading rule and chain (`name: "berth-…" id: "<id>"`);
  - host-local's address record for it.
A fleet of deploy/up.sh (node ids without that form) and running tests are left alone.

Usage: sweep-test-networks.py [NETNS_ROOT] [IPAM_DIR]
"""
import ctypes
import os
import re
import shlex
import subprocess
import sys

NETNS_ROOT = sys.argv[1] if len(sys.argv) > 1 else "/run/berth/netns"
IPAM_DIR = sys.argv[2] if len(sys.argv) > 2 else "/run/berth/cni-ipam"
# Node ids the tests make, with the test process's pid: tests/tests/common (fleets) and
# tests/tests/packages.rs.
TEST_NODE = re.compile(r"^(?:e(\d+)x\d+-.*|pkg-(?:lost-)?(\d+))$")
RULE_ID = re.compile(r'name: \\?"berth-[^"\\]*\\?" id: \\?"([^"\\]+)\\?"')
MNT_DETACH = 2

libc = ctypes.CDLL(None, use_errno=True)


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def sweep_namespaces():
    removed = 0
    if not os.path.isdir(NETNS_ROOT):
        return removed
    for node in os.listdir(NETNS_ROOT):
        m = TEST_NODE.match(node)
        if not m or alive(int(m.group(1) or m.group(2))):
            continue
        d = os.path.join(NETNS_ROOT, node)
        for name in os.listdir(d):
            path = os.path.join(d, name)
            libc.umount2(path.encode(), MNT_DETACH)  # not mounted: nothing to do
            try:
                os.remove(path)
                removed += 1
            except OSError as e:
                print(f"sweep: cannot remove {path}: {e}", file=sys.stderr)
        try:
            os.rmdir(d)
        except OSError:
            pass
    return removed


def live_ids():
    ids = set()
    if os.path.isdir(NETNS_ROOT):
        for node in os.listdir(NETNS_ROOT):
            d = os.path.join(NETNS_ROOT, node)
            if os.path.isdir(d):
                ids.update(os.listdir(d))
    return ids


def sweep_masquerading(live):
    try:
        saved = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True,
                               text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    removed = 0
    for line in saved.splitlines():
        if not line.startswith("-A POSTROUTING "):
            continue
        m = RULE_ID.search(line)
        if not m or m.group(1) in live:
            continue
        args = shlex.split(line)
        chain = args[args.index("-j") + 1] if "-j" in args else None
        rule = ["iptables", "-w", "-t", "nat", "-D"] + args[1:]
        if subprocess.run(rule, capture_output=True).returncode != 0:
            continue
        removed += 1
        if chain and chain.startswith("CNI-"):
            subprocess.run(["iptables", "-w", "-t", "nat", "-F", chain], capture_output=True)
            subprocess.run(["iptables", "-w", "-t", "nat", "-X", chain], capture_output=True)
    return removed


def sweep_addresses(live):
    removed = 0
    if not os.path.isdir(IPAM_DIR):
        return removed
    for net in os.listdir(IPAM_DIR):
        d = os.path.join(IPAM_DIR, net)
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if not re.match(r"^\d+\.\d+\.\d+\.\d+$", name):
                continue  # the lock and last_reserved_ip files
            path = os.path.join(d, name)
            try:
                with open(path) as f:
                    owner = f.readline().strip()
            except OSError:
                continue
            if owner and owner not in live:
                os.remove(path)
                removed += 1
    return removed


def main():
    namespaces = sweep_namespaces()
    live = live_ids()
    rules = sweep_masquerading(live)
    addresses = sweep_addresses(live)
    if namespaces or rules or addresses:
        print(f"released what dead test fleets left: {namespaces} network namespaces, "
              f"{rules} masquerading rules, {addresses} addresses")


if __name__ == "__main__":
    main()
