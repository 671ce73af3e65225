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
import contextlib
import ctypes
import functools
import os
import random
import signal
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script: the checkout's root, for the bench package and the test
# driver it shares (tests/helper_proc).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.fixtures import (
    AuthbindWorker,
    RawHelper,
    authbind_port,
    bench_policy,
    build_c,
    preflight,
)
from bench.plan import BENCH, BUILD, COMBOS, KINDS, PIPELINE_BASE, PIPELINERS, PORT, BenchError
from bench.roundtrip import (
    c_in_process,
    c_pipelined,
    c_round_trips,
    client_round_trips,
    py_in_process,
    py_pipelined,
    raw_round_trips,
)
from bench.startup import (
    ALL_PORTS_POLICY,
    exec_true,
    import_times,
    landlock_cost,
    memory,
    start_c_helper,
    start_privsock,
    start_python,
)
from privsock.client import SocketCreator
from privsock.errors import CreatorError
from privsock.helperprocess import default_helper_argv


def run_rounds(args: argparse.Namespace, lib: ctypes.CDLL, policy: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "round_trip": {f"{k}/{t}/{f}": [] for k, _ in KINDS for t, f in COMBOS},
        "pipelined": {f"{who}/depth{d}": [] for who, _, depths in PIPELINERS for d in depths},
        "start_up": {"privsock": [], "c_helper": [], "python": [], "exec_true": []},
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
            ("start_up", "exec_true", lambda: exec_true(policy)),
            ("landlock", "policy", lambda: landlock_cost(policy.read_text())),
            ("landlock", "all_ports", lambda: landlock_cost(ALL_PORTS_POLICY)),
        ]
        for _, _, task in tasks:  # a warm-up round, not recorded
            task()
        pids = {"privsock": creator.pid, "c_helper": c_helper.proc.pid,
                "min_helper": min_helper.proc.pid}  # fmt: skip
        # Memory at the end of every round: one reading varies by up to a MiB.
        mem_rounds: list[dict[str, dict[str, int]]] = []
        rng = random.Random(args.seed)  # noqa: S311 (an order, not a secret)
        for r in range(args.rounds):
            rng.shuffle(tasks)
            for section, key, task in tasks:
                results[section][key].append(task())
            mem_rounds.append({name: memory(pid) for name, pid in pids.items() if pid})
            print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        results["memory_kib_rounds"] = mem_rounds
        results["memory_kib"] = {
            name: {key: int(statistics.median(m[name][key] for m in mem_rounds))
                   for key in mem_rounds[0][name]}
            for name in mem_rounds[0]
        }  # fmt: skip
    results["pipelined_requests"] = npipe
    return results


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
    except CreatorError as exc:  # a helper that refused, died or could not start
        print(f"bench: the privsock client failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbench: interrupted; authbind's configuration was put back", file=sys.stderr)
        return 130
    machine = report.machine_info(args.rounds)
    machine["load_start"], machine["load_end"] = load_start, os.getloadavg()[0]
    report.write(vars(args), machine, results, last_run=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
