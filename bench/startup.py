"""Start-up and memory: spawn to the first PING reply, Landlock's share, the
helper's import times and its RSS once serving."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.fixtures import RawHelper
from bench.plan import BUILD, EXEC_PORT, EXEC_USER, REPO, BenchError
from privsock.client import SocketCreator
from privsock.helperprocess import HELPER_ENV


def start_privsock(policy: Path) -> int:
    t0 = time.perf_counter_ns()
    creator = SocketCreator(str(policy), audit_sink=None)
    creator.start()
    elapsed = time.perf_counter_ns() - t0
    creator.close()
    return elapsed


def start_c_helper() -> int:
    t0 = time.perf_counter_ns()
    helper = RawHelper([str(BUILD / "ref_helper")])
    elapsed = time.perf_counter_ns() - t0
    helper.close()
    return elapsed


def exec_true(policy: Path) -> int:
    """Wall time of a whole `privsock exec ... -- /bin/true`: the boss's start
    and imports, the helper's hardened start-up, one grant, the drop, the exec."""
    argv = [str(REPO / ".venv" / "bin" / "privsock"), "exec", "--policy", str(policy),
            "--user", EXEC_USER, "--listen", f"tcp:127.0.0.1:{EXEC_PORT}", "--", "/bin/true"]
    t0 = time.perf_counter_ns()
    done = subprocess.run(argv, capture_output=True, check=False)
    elapsed = time.perf_counter_ns() - t0
    if done.returncode != 0:
        raise BenchError(f"privsock exec ... -- /bin/true: exit {done.returncode}: "
                         f"{done.stderr[-300:]!r}")  # fmt: skip
    return elapsed


# The bare interpreter the venv runs (Debian's /usr/bin/python3), outside the
# venv: its site-packages add nothing to the baseline's start-up.
BARE_PYTHON = os.path.realpath(sys.executable)


def start_python() -> int:
    t0 = time.perf_counter_ns()
    subprocess.run([BARE_PYTHON, "-I", "-c", "pass"], check=True, env=HELPER_ENV)
    return time.perf_counter_ns() - t0


# Times, in a fresh process (a Landlock domain is for life), what the helper's
# steps 7 and 10 cost: computing the TCP ports and applying the ruleset, then
# the probe bind that Landlock must refuse.
LANDLOCK_WORKER = """
import socket, sys, time
import prctl
from privsock.helper import landlock
from privsock.helper.policy import tcp_bind_ports
from privsock.helper.policyparse import parse_policy
policy = parse_policy(sys.argv[1])
prctl.set_no_new_privs(1)
t0 = time.perf_counter_ns()
applied = landlock.apply(tcp_bind_ports(policy))
t1 = time.perf_counter_ns()
probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
try:
    probe.bind(("127.0.0.1", 0))
    refused = False
except PermissionError:
    refused = True
probe.close()
t2 = time.perf_counter_ns()
print(t1 - t0, t2 - t1, applied.tcp_ports, refused)
"""
ALL_PORTS_POLICY = """version = 1
[[allow]]
transports = ["tcp"]
ports = ["1-65535"]
addresses = ["127.0.0.0/8"]
"""


def landlock_cost(policy_text: str) -> tuple[int, int, int]:
    """(ns for the ruleset, ns for the probe, TCP ports in the ruleset)."""
    done = subprocess.run([sys.executable, "-I", "-c", LANDLOCK_WORKER, policy_text],
                          capture_output=True, text=True, env=HELPER_ENV, check=False)  # fmt: skip
    fields = done.stdout.split()
    if done.returncode != 0 or len(fields) != 4 or fields[3] != "True":
        raise BenchError(f"Landlock worker: {done.returncode} {done.stdout!r} {done.stderr!r}")
    return int(fields[0]), int(fields[1]), int(fields[2])


def import_times(runs: int = 5) -> dict[str, Any]:
    """`python -X importtime` of the helper's imports, `runs` times: the run with
    the median total, its top-level modules by cumulative microseconds, and
    every run's total."""
    found: list[tuple[int, list[dict[str, Any]], list[dict[str, Any]]]] = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-I", "-X", "importtime", "-c", "import privsock.helper.main"],
            capture_output=True, text=True, check=True, env=HELPER_ENV,
        )  # fmt: skip
        rows: list[dict[str, Any]] = []
        for line in done.stderr.splitlines():
            hit = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
            if hit:
                rows.append({"self_us": int(hit[1]), "cumulative_us": int(hit[2]),
                             "depth": (len(hit[3]) - 1) // 2, "module": hit[4]})  # fmt: skip
        top = [r for r in rows if r["depth"] == 0]
        found.append((sum(int(r["cumulative_us"]) for r in top), top, rows))
    found.sort(key=lambda run: run[0])
    total, top, rows = found[len(found) // 2]
    return {
        "total_us": total,
        "top_level": sorted(top, key=lambda r: -r["cumulative_us"]),
        "all": rows,
        "totals_us": [run[0] for run in found],
    }


def memory(pid: int) -> dict[str, int]:
    """The VmRSS/RssAnon/RssFile/VmHWM lines of /proc/PID/status, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0])
    return out

