"""privsock benchmarks: ratios against baselines measured in the same run.

    .venv/bin/python bench/run.py [--rounds N] [--batch N] [--quick]   (make bench)

Needs root, gcc and authbind (scripts/bootstrap --bench installs them). Every
kind of measurement runs in every round, in a shuffled order, so that a noisy
neighbour hits all of them alike; a round's figure is the median of its batch,
and the table shows the median of the rounds' figures with their min-max.
Ratios are taken round by round, between figures measured seconds apart.

Measured (details in bench/README.md):
  round trip   CREATE -> fd received and closed, UDP/TCP x IPv4/IPv6:
               privsock (SocketCreator + hardened helper), the C driver against
               the privsock helper (its cost alone), SocketCreator against the C
               reference helper (the client's cost alone), C against C (the
               physical limit), socket+bind+close in-process in Python and in C
               as root, and authbind as user privsock.
  pipelined    requests in flight before replies are read, over the raw channel
               (the client has no pipelining API).
  start-up     spawn to the first PING reply, fully hardened; import times;
               the Landlock ruleset (ports computed, ruleset applied) and the
               probe bind, each timed inside a fresh process.
  memory       the helper's RSS once serving.

Raw numbers go to bench/results/<time>.json; the table to stdout and to
bench/LAST_RUN.md. Only the ratios carry over between machines.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import datetime
import functools
import ipaddress
import json
import os
import platform
import pwd
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Run as a script: the checkout's root, for the test driver it shares (tests/helper_proc).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from privsock.client import SocketCreator
from privsock.helper import protocol
from privsock.helperprocess import HELPER_ENV, default_helper_argv
from tests.helper_proc import HelperChannel

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BUILD = BENCH / "build"
RESULTS = BENCH / "results"
POLICY_SOURCE = REPO / "policy" / "examples" / "bench.toml"

USER = "privsock"  # the helper's user, and the one authbind lets bind
# Each helper binds its own ports: a helper closes its copy of a sent socket only
# after sendmsg, so another helper binding the same port at once could collide.
# All are in policy/examples/bench.toml's 900-929, which the tests do not use.
PORTS = range(900, 930)
PORT = {
    "privsock": 900, "authbind": 901, "in_process": 902, "raw_helper": 903,
    "to_c": 912, "c_helper": 913, "min_helper": 922,
}  # fmt: skip
PIPELINE_BASE = {"raw_helper": 904, "c_helper": 914}  # + up to 8 ports each
AUTHBIND_FILE = Path("/etc/authbind/byport") / f"!{PORT['authbind']}"  # "!" for 512-1023

COMBOS = [("udp", 4), ("udp", 6), ("tcp", 4), ("tcp", 6)]
ADDRESS = {4: "127.0.0.1", 6: "::1"}
TRANSPORT = {"udp": 1, "tcp": 2}

# (key, label) of each round-trip kind, in table order.
KINDS = [
    ("privsock", "privsock: SocketCreator.create + privsock-helper"),
    ("c_to_helper", "C driver -> privsock-helper (helper alone)"),
    ("client_to_c", "SocketCreator -> C reference helper (client alone)"),
    ("min_helper", "C driver -> minimal Python helper (Python floor, helper side)"),
    ("raw_py_to_c", "minimal Python client -> C reference helper (Python floor, client side)"),
    ("c_limit", "C driver -> C reference helper (physical limit)"),
    ("inproc_py", "in-process socket+bind+close, Python, root"),
    ("inproc_c", "in-process socket+bind+close, C, root"),
    ("authbind", "authbind: socket+bind+close, Python as user privsock"),
]
PIPELINE_DEPTHS = (1, 4, 8)
# The helper serves a CREATE only once every earlier reply has been read (one
# socket in flight per boss: privsock/helper/PROTOCOL.md), so it is measured at depth 1.
PIPELINERS = [
    ("privsock_py", "privsock.helper.protocol in Python -> privsock-helper", (1,)),
    ("privsock_c", "C driver -> privsock-helper", (1,)),
    ("c_limit", "C driver -> C reference helper", PIPELINE_DEPTHS),
]


class BenchError(Exception):
    """A precondition or a measurement failed; one line for the user."""


# ---------------------------------------------------------------------------
# Setting up: the C code, the policy, authbind


def build_c() -> ctypes.CDLL:
    BUILD.mkdir(exist_ok=True)
    flags = ["-O2", "-Wall", "-Wextra", "-Werror"]
    steps = [
        ["gcc", *flags, "-o", str(BUILD / "ref_helper"), str(BENCH / "ref_helper.c")],
        ["gcc", *flags, "-shared", "-fPIC", "-o", str(BUILD / "libref_driver.so"),
         str(BENCH / "ref_driver.c")],
    ]  # fmt: skip
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise BenchError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    lib = ctypes.CDLL(str(BUILD / "libref_driver.so"))
    i64p = ctypes.POINTER(ctypes.c_int64)
    lib.round_trips.argtypes = [ctypes.c_int] * 5 + [i64p]
    lib.pipelined.argtypes = [ctypes.c_int] * 6 + [i64p]
    lib.in_process.argtypes = [ctypes.c_int] * 4 + [i64p]
    return lib


@contextlib.contextmanager
def bench_policy() -> Iterator[Path]:
    """The bench policy copied into a fresh root-only directory with mode 0644,
    so the helper's ownership checks pass whatever the checkout's modes are."""
    tmp = Path(tempfile.mkdtemp(prefix="privsock-bench-"))
    try:
        path = tmp / "bench.toml"
        shutil.copyfile(POLICY_SOURCE, path)
        path.chmod(0o644)
        yield path
    finally:
        shutil.rmtree(tmp)


@contextlib.contextmanager
def authbind_port() -> Iterator[None]:
    """Let user privsock bind PORT["authbind"] through authbind; put back what was there."""
    saved: tuple[bytes, os.stat_result] | None = None
    if AUTHBIND_FILE.exists() or AUTHBIND_FILE.is_symlink():
        saved = (AUTHBIND_FILE.read_bytes(), AUTHBIND_FILE.lstat())
    AUTHBIND_FILE.parent.mkdir(parents=True, exist_ok=True)
    AUTHBIND_FILE.unlink(missing_ok=True)
    AUTHBIND_FILE.touch(mode=0o500)
    pw = pwd.getpwnam(USER)
    os.chown(AUTHBIND_FILE, pw.pw_uid, pw.pw_gid)
    AUTHBIND_FILE.chmod(0o500)
    try:
        yield
    finally:
        AUTHBIND_FILE.unlink(missing_ok=True)
        if saved is not None:
            data, st = saved
            AUTHBIND_FILE.write_bytes(data)
            os.chown(AUTHBIND_FILE, st.st_uid, st.st_gid)
            AUTHBIND_FILE.chmod(st.st_mode & 0o7777)


# ---------------------------------------------------------------------------
# The things measured


class RawHelper(HelperChannel):
    """A helper process on the raw test channel (no SocketCreator). Its stderr
    (the audit log) goes to a temporary file: no reader competes for the two
    cores, so the rows driven this way show the helper's own cost."""

    def __init__(self, argv: list[str]) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        super().__init__(argv, stderr=self.log)
        if not self.ping_ok():
            self.close()
            raise BenchError(f"{argv[0]} did not answer PING: {self.tail[-300:]!r}")
        self.chan.settimeout(None)

    @property
    def tail(self) -> bytes:
        self.log.seek(0, os.SEEK_END)
        self.log.seek(max(0, self.log.tell() - 4096))
        return self.log.read()

    def close(self) -> int:
        code = super().close()
        self.log.close()
        return code


class AuthbindWorker:
    """bench/authbind_worker.py as user privsock under authbind, kept running."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["runuser", "-u", USER, "--", "authbind", "--deep", sys.executable, "-I",
             str(BENCH / "authbind_worker.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def binds(self, transport: str, family: int, count: int) -> list[int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{transport} {family} {PORT['authbind']} {count}\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline() or '{"error": "worker died"}')
        if isinstance(answer, dict):
            raise BenchError(f"authbind {transport}/IPv{family}: {answer['error']}")
        return [int(x) for x in answer]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


ANCBUF = socket.CMSG_SPACE(4 * array.array("i").itemsize)


def _ns_array(n: int) -> Any:
    return (ctypes.c_int64 * n)()


def c_failure(lib: ctypes.CDLL, rc: int) -> str:
    """What a negative return of the C driver means."""
    if rc <= -30000:
        return "short reply"
    if rc <= -20000:
        return "an OK reply without exactly one fd"
    if rc <= -10000:
        raw = bytes((ctypes.c_ubyte * protocol.REPLY_SIZE).in_dll(lib, "last_reply"))
        return f"reply {protocol.decode_reply(raw)}"
    return os.strerror(-rc)


def c_round_trips(lib: ctypes.CDLL, chan: socket.socket, transport: str, family: int,
                  port: int, n: int) -> list[int]:  # fmt: skip
    out = _ns_array(n)
    rc = lib.round_trips(chan.fileno(), n, TRANSPORT[transport], family, port, out)
    if rc:
        raise BenchError(f"C driver {transport}/IPv{family}: {c_failure(lib, rc)}")
    return list(out)


def client_round_trips(creator: SocketCreator, transport: str, family: int, port: int,
                       n: int) -> list[int]:  # fmt: skip
    address, clock, samples = ADDRESS[family], time.perf_counter_ns, []
    for _ in range(n):
        t0 = clock()
        creator.create(transport, address, port).close()
        samples.append(clock() - t0)
    return samples


def _receive_one(chan: socket.socket) -> tuple[bytes, list[int]]:
    data, anc, _flags, _ = chan.recvmsg(protocol.REPLY_SIZE + 1, ANCBUF, socket.MSG_CMSG_CLOEXEC)
    return data, protocol.received_fds(anc)


def raw_round_trips(chan: socket.socket, transport: str, family: int, port: int,
                    n: int) -> list[int]:  # fmt: skip
    """The least a Python boss can do per socket: send fixed bytes, take the fd, close it."""
    address = ipaddress.ip_address(ADDRESS[family])
    req = protocol.Create(1, protocol.Transport[transport.upper()], address, port)
    request = protocol.encode_request(req)
    clock, samples = time.perf_counter_ns, []
    for _ in range(n):
        t0 = clock()
        chan.sendmsg([request])
        data, fds = _receive_one(chan)
        for fd in fds:
            os.close(fd)
        samples.append(clock() - t0)
        if len(fds) != 1:
            raise BenchError(f"raw Python client {transport}/IPv{family}: reply {data!r}")
    return samples


def py_in_process(transport: str, family: int, n: int) -> list[int]:
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    address, clock, samples = ADDRESS[family], time.perf_counter_ns, []
    for _ in range(n):
        t0 = clock()
        with socket.socket(af, kind) as sock:
            if family == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((address, PORT["in_process"]))
        samples.append(clock() - t0)
    return samples


def c_in_process(lib: ctypes.CDLL, transport: str, family: int, n: int) -> list[int]:
    out = _ns_array(n)
    rc = lib.in_process(n, TRANSPORT[transport], family, PORT["in_process"], out)
    if rc:
        raise BenchError(f"C in-process {transport}/IPv{family}: {c_failure(lib, rc)}")
    return list(out)


def c_pipelined(lib: ctypes.CDLL, chan: socket.socket, base: int, depth: int, n: int) -> int:
    total = ctypes.c_int64()
    rc = lib.pipelined(chan.fileno(), n, depth, TRANSPORT["udp"], 4, base, ctypes.byref(total))
    if rc:
        raise BenchError(f"C pipelined, depth {depth}: {c_failure(lib, rc)}")
    return total.value


def py_pipelined(chan: socket.socket, base: int, depth: int, n: int) -> int:
    """c_pipelined in Python with privsock.helper.protocol, over the raw channel."""
    address = ipaddress.IPv4Address(ADDRESS[4])
    sent = done = 0
    t0 = time.perf_counter_ns()
    while done < n:
        while sent < n and sent - done < depth:
            req = protocol.Create(sent + 1, protocol.Transport.UDP, address, base + sent % depth)
            chan.sendmsg([protocol.encode_request(req)])
            sent += 1
        data, fds = _receive_one(chan)
        for fd in fds:
            os.close(fd)
        reply = protocol.decode_reply(data)
        if reply.status is not protocol.Status.OK or len(fds) != 1:
            raise BenchError(f"Python pipelined, depth {depth}: {reply}, {len(fds)} fds")
        done += 1
    return time.perf_counter_ns() - t0


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


def start_python() -> int:
    t0 = time.perf_counter_ns()
    subprocess.run([sys.executable, "-I", "-c", "pass"], check=True, env=HELPER_ENV)
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


# ---------------------------------------------------------------------------
# Running the rounds


def median_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1000.0


def run_rounds(args: argparse.Namespace, lib: ctypes.CDLL, policy: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "round_trip": {f"{k}/{t}/{f}": [] for k, _ in KINDS for t, f in COMBOS},
        "pipelined": {f"{who}/depth{d}": [] for who, _, depths in PIPELINERS for d in depths},
        "start_up": {"privsock": [], "c_helper": [], "python": []},
        "landlock": {"policy": [], "all_ports": []},  # (ruleset ns, probe ns, ports)
    }
    with contextlib.ExitStack() as stack:
        creator = stack.enter_context(SocketCreator(str(policy), audit_sink=None))
        ref = str(BUILD / "ref_helper")
        to_c = stack.enter_context(SocketCreator(str(policy), audit_sink=None, helper_argv=[ref]))
        raw = RawHelper([*default_helper_argv(), "--policy", str(policy)])
        stack.callback(raw.close)
        c_helper = RawHelper([ref])
        stack.callback(c_helper.close)
        min_helper = RawHelper([sys.executable, "-I", str(BENCH / "min_helper.py")])
        stack.callback(min_helper.close)
        worker = AuthbindWorker()
        stack.callback(worker.close)

        n, nslow, npipe = args.batch, max(10, args.batch // 8), args.batch * 2
        per_combo: dict[str, Callable[[str, int], list[int]]] = {
            "privsock": lambda t, f: client_round_trips(creator, t, f, PORT["privsock"], n),
            "c_to_helper": lambda t, f: c_round_trips(lib, raw.chan, t, f, PORT["raw_helper"], n),
            "client_to_c": lambda t, f: client_round_trips(to_c, t, f, PORT["to_c"], n),
            "min_helper": lambda t, f: c_round_trips(lib, min_helper.chan, t, f,
                                                     PORT["min_helper"], n),
            "raw_py_to_c": lambda t, f: raw_round_trips(c_helper.chan, t, f, PORT["c_helper"], n),
            "c_limit": lambda t, f: c_round_trips(lib, c_helper.chan, t, f, PORT["c_helper"], n),
            "inproc_py": lambda t, f: py_in_process(t, f, n),
            "inproc_c": lambda t, f: c_in_process(lib, t, f, n),
            "authbind": lambda t, f: worker.binds(t, f, nslow),
        }  # fmt: skip
        pipeliners: dict[str, Callable[[int], int]] = {
            "privsock_py": lambda d: py_pipelined(raw.chan, PIPELINE_BASE["raw_helper"], d, npipe),
            "privsock_c": lambda d: c_pipelined(lib, raw.chan, PIPELINE_BASE["raw_helper"], d,
                                                npipe),
            "c_limit": lambda d: c_pipelined(lib, c_helper.chan, PIPELINE_BASE["c_helper"], d,
                                             npipe),
        }  # fmt: skip
        tasks: list[tuple[str, str, Callable[[], Any]]] = [
            ("round_trip", f"{k}/{t}/{f}", functools.partial(run, t, f))
            for k, run in per_combo.items() for t, f in COMBOS
        ]  # fmt: skip
        depths = {who: ds for who, _, ds in PIPELINERS}
        tasks += [("pipelined", f"{k}/depth{d}", functools.partial(run, d))
                  for k, run in pipeliners.items() for d in depths[k]]  # fmt: skip
        tasks += [
            ("start_up", "privsock", lambda: start_privsock(policy)),
            ("start_up", "c_helper", start_c_helper),
            ("start_up", "python", start_python),
            ("landlock", "policy", lambda: landlock_cost(policy.read_text())),
            ("landlock", "all_ports", lambda: landlock_cost(ALL_PORTS_POLICY)),
        ]
        for _, _, task in tasks:  # a warm-up round, not recorded
            task()
        rng = random.Random(args.seed)  # noqa: S311 (an order, not a secret)
        for r in range(args.rounds):
            rng.shuffle(tasks)
            for section, key, task in tasks:
                results[section][key].append(task())
            print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        pids = {"privsock": creator.pid, "c_helper": c_helper.proc.pid,
                "min_helper": min_helper.proc.pid}  # fmt: skip
        results["memory_kib"] = {name: memory(pid) for name, pid in pids.items() if pid}
    results["pipelined_requests"] = npipe
    return results


# ---------------------------------------------------------------------------
# Summaries and the table


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    rt = {key: [median_us(batch) for batch in rounds]
          for key, rounds in results["round_trip"].items()}  # fmt: skip
    summary: dict[str, Any] = {"round_trip_us": {k: spread(v) for k, v in rt.items()}}

    def ratio(a: str, b: str) -> dict[str, float]:
        return spread([x / y for x, y in zip(rt[a], rt[b], strict=True)])

    summary["ratios"] = {}
    for t, f in COMBOS:
        c = f"{t}/{f}"
        summary["ratios"][c] = {
            "privsock/c_limit": ratio(f"privsock/{c}", f"c_limit/{c}"),
            "helper_alone/c_limit": ratio(f"c_to_helper/{c}", f"c_limit/{c}"),
            "client_alone/c_limit": ratio(f"client_to_c/{c}", f"c_limit/{c}"),
            "min_py_helper/c_limit": ratio(f"min_helper/{c}", f"c_limit/{c}"),
            "authbind/privsock": ratio(f"authbind/{c}", f"privsock/{c}"),
            "privsock/inproc_py": ratio(f"privsock/{c}", f"inproc_py/{c}"),
        }
    n = results["pipelined_requests"]
    summary["pipelined_per_s"] = {
        key: spread([n / (ns / 1e9) for ns in rounds])
        for key, rounds in results["pipelined"].items()
    }
    summary["start_up_ms"] = {k: spread([ns / 1e6 for ns in v])
                              for k, v in results["start_up"].items()}  # fmt: skip
    start = results["start_up"]
    summary["start_up_ratio"] = spread(
        [a / b for a, b in zip(start["privsock"], start["python"], strict=True)]
    )
    ll = results["landlock"]
    summary["landlock_ms"] = {
        "ruleset": spread([r / 1e6 for r, _, _ in ll["policy"]]),
        "probe": spread([p / 1e6 for _, p, _ in ll["policy"]]),
        "ruleset_all_ports": spread([r / 1e6 for r, _, _ in ll["all_ports"]]),
    }
    summary["landlock_ports"] = {k: v[0][2] for k, v in ll.items()}
    # Steps 7 and 10 as a share of the whole start-up measured in the same round.
    summary["landlock_share_of_start_up"] = spread(
        [(r + p) / s for (r, p, _), s in zip(ll["policy"], start["privsock"], strict=True)]
    )
    return summary


def targets(summary: dict[str, Any], results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each judged on its worst transport/family."""
    ratios = summary["ratios"].values()
    rss = results["memory_kib"]["privsock"]["VmRSS"] / 1024
    found = [
        {"target": "round trip <= 1.5x the C reference (worst of the four)", "limit": 1.5,
         "measured": max(r["privsock/c_limit"]["median"] for r in ratios), "unit": "x"},
        {"target": ">= 20x faster than authbind (worst of the four)", "limit": 20.0,
         "measured": min(r["authbind/privsock"]["median"] for r in ratios), "unit": "x",
         "at_least": True},
        {"target": "helper start-up to hardened and serving <= 80 ms", "limit": 80.0,
         "measured": summary["start_up_ms"]["privsock"]["median"], "unit": " ms"},
        {"target": "helper RSS while serving <= 16 MiB", "limit": 16.0, "measured": rss,
         "unit": " MiB"},
    ]  # fmt: skip
    for t in found:
        t["met"] = t["measured"] >= t["limit"] if t.get("at_least") else t["measured"] <= t["limit"]
    return found


def fmt(s: dict[str, float], digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def table(summary: dict[str, Any], results: dict[str, Any], machine: dict[str, Any]) -> str:
    rt, ratios = summary["round_trip_us"], summary["ratios"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, Linux {machine['kernel']}, "
        f"{machine['os']}, Python {machine['python']}. {machine['date']}.",
        f"{machine['rounds']} rounds, interleaved in a shuffled order; each figure is the median "
        "of the rounds' medians, (min-max) of the rounds' medians. Ratios are taken round by "
        "round. Only the ratios carry over between machines.",
        f"Load average (1 min) at start and end: {machine['load_start']:.2f}, "
        f"{machine['load_end']:.2f}.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in summary["targets"]:
        verdict = "yes" if t["met"] else "NO"
        lines.append(f"| {t['target']} | {t['measured']:.2f}{t['unit']} | {verdict} |")
    lines += [
        "",
        "Round trip, µs per bound socket (CREATE -> fd received and closed):",
        "",
        "| | " + " | ".join(f"{t.upper()} IPv{f}" for t, f in COMBOS) + " |",
        "|---|" + "---|" * len(COMBOS),
    ]
    for key, label in KINDS:
        lines.append(f"| {label} | " + " | ".join(fmt(rt[f"{key}/{t}/{f}"]) for t, f in COMBOS)
                     + " |")  # fmt: skip
    lines += ["", "Ratios (same round):", "",
              "| | " + " | ".join(f"{t.upper()} IPv{f}" for t, f in COMBOS) + " | target |",
              "|---|" + "---|" * (len(COMBOS) + 1)]  # fmt: skip
    targets = {"privsock/c_limit": "<= 1.5", "authbind/privsock": ">= 20"}
    for name in ratios[f"{COMBOS[0][0]}/{COMBOS[0][1]}"]:
        lines.append(f"| {name} | " + " | ".join(fmt(ratios[f"{t}/{f}"][name], 2)
                                                 for t, f in COMBOS)
                     + f" | {targets.get(name, '')} |")  # fmt: skip
    pipe = summary["pipelined_per_s"]
    lines += ["", f"Pipelined, UDP IPv4, {results['pipelined_requests']} requests per batch, "
              "thousand requests/s (raw channel: the client has one request in flight; "
              "the helper serves one socket in flight per boss by design):", "",
              "| requests in flight | " + " | ".join(str(d) for d in PIPELINE_DEPTHS) + " |",
              "|---|" + "---|" * len(PIPELINE_DEPTHS)]  # fmt: skip
    for who, label, _ in PIPELINERS:
        lines.append(f"| {label} | " + " | ".join(
            fmt({k: v / 1000 for k, v in pipe[f"{who}/depth{d}"].items()})
            if f"{who}/depth{d}" in pipe else "one in flight"
            for d in PIPELINE_DEPTHS) + " |")  # fmt: skip
    su, mem, imp = summary["start_up_ms"], results["memory_kib"], results["import_times"]
    lk = summary["landlock_ms"]
    top = ", ".join(f"{r['module']} {r['cumulative_us'] / 1000:.1f}"
                    for r in imp["top_level"][:6])  # fmt: skip
    lines += [
        "",
        "Start-up, ms from spawn to the first PING reply (target <= 80 ms for privsock):",
        "",
        "| privsock-helper, hardened (SocketCreator.start) | C reference helper "
        "| `python -I -c pass` to exit | privsock / python (same round) |",
        "|---|---|---|---|",
        f"| {fmt(su['privsock'])} | {fmt(su['c_helper'])} | {fmt(su['python'])} "
        f"| {fmt(summary['start_up_ratio'], 2)} |",
        "",
        f"Landlock at start-up, ms, each timed inside a fresh process: the ruleset for "
        f"the bench policy's {summary['landlock_ports']['policy']} TCP ports (ports computed, "
        f"ruleset created, one rule per port, applied) {fmt(lk['ruleset'], 3)}, the probe "
        f"bind that Landlock must refuse {fmt(lk['probe'], 3)}; together "
        f"{fmt({k: v * 100 for k, v in summary['landlock_share_of_start_up'].items()}, 2)}% "
        f"of the helper's start-up in the same round. A ruleset for all "
        f"{summary['landlock_ports']['all_ports']:,} TCP ports: "
        f"{fmt(lk['ruleset_all_ports'])}.",
        "",
        f"`python -X importtime` of the helper's imports (the median of "
        f"{len(imp['totals_us'])} runs): {imp['total_us'] / 1000:.1f} ms in all; "
        f"largest (cumulative ms): {top}.",
        "",
        "Memory once serving, MiB (target VmRSS <= 16 MiB for privsock):",
        "",
        "| | VmRSS | RssAnon | RssFile | VmHWM |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("privsock", "privsock-helper"), ("min_helper", "minimal Python helper"),
                        ("c_helper", "C reference helper")):  # fmt: skip
        m = mem[name]
        mib = [f"{m[k] / 1024:.1f}" for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")]
        lines.append(f"| {label} | " + " | ".join(mib) + " |")
    return "\n".join(lines) + "\n"


def machine_info(rounds: int) -> dict[str, Any]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    os_name = platform.system()
    with contextlib.suppress(OSError):
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", os_name)
    return {
        "cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(), "os": os_name,
        "python": platform.python_version(), "rounds": rounds,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }  # fmt: skip


def preflight() -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root (make bench): the helper starts as root")
    for tool in ("gcc", "authbind", "runuser"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is missing: run scripts/bootstrap --bench")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        raise BenchError(f"user {USER} is missing: run scripts/bootstrap") from None
    for port in PORTS:
        for af, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(af, kind) as s:
                    try:
                        s.bind((addr, port))
                    except OSError as exc:
                        raise BenchError(
                            f"cannot bind {addr} port {port}: {exc.strerror} "
                            f"(the bench needs ports {PORTS[0]}-{PORTS[-1]} free)"
                        ) from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds (default 20)")
    parser.add_argument("--batch", type=int, default=400,
                        help="round trips per batch (default 400; authbind an eighth)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 100: a smoke test")
    parser.add_argument("--seed", type=int, default=1, help="shuffle seed")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batch = 3, 100
    if args.rounds < 1 or args.batch < 10:
        parser.error("--rounds must be >= 1 and --batch >= 10")
    # A Ctrl-C or kill must still restore /etc/authbind and remove the temp policy.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    load_start = os.getloadavg()[0]
    try:
        preflight()
        lib = build_c()
        with bench_policy() as policy, authbind_port():
            results = run_rounds(args, lib, policy)
        results["import_times"] = import_times()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted; authbind's configuration was put back", file=sys.stderr)
        return 130
    machine = machine_info(args.rounds)
    machine["load_start"], machine["load_end"] = load_start, os.getloadavg()[0]
    summary = summarise(results)
    summary["targets"] = targets(summary, results)
    text = table(summary, results, machine)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps({"machine": machine, "args": vars(args), "summary": summary,
                               "raw": results}) + "\n")  # fmt: skip
    if args.quick:
        print(f"raw numbers: {out.relative_to(REPO)} (--quick: LAST_RUN.md left alone)",
              file=sys.stderr)  # fmt: skip
        return 0
    (BENCH / "LAST_RUN.md").write_text(
        "# Last benchmark run\n\nWritten by `make bench` (bench/run.py); raw numbers in "
        f"bench/results/{out.name} on the machine that ran it.\n\n" + text
    )
    print(f"raw numbers: {out.relative_to(REPO)}; table: bench/LAST_RUN.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
