"""cProfile of the boss's side of one bound socket: SocketCreator.create(...).close()
against the real, hardened helper, N times, with each kind of audit sink.

    .venv/bin/python bench/profile_boss.py [--count N] [--sink none|logging|file] [--top K]

Run as root (the helper starts as root). The summary (bench/README.md's
boss-side profile) is the top K functions by own time. A profile, not a
benchmark: cProfile's own overhead inflates every Python call alike.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout

from bench.fixtures import bench_policy
from privsock.auditsink import FileSink, LoggingSink
from privsock.client import SocketCreator

PORT = 928  # in policy/examples/bench.toml's 900-929; bench/run.py uses up to 922


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--sink", choices=("none", "logging", "file"), default="none")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    with bench_policy() as policy, tempfile.TemporaryDirectory() as tmp:
        sink = {"none": None, "logging": LoggingSink(),
                "file": FileSink(str(Path(tmp) / "audit.log"))}[args.sink]  # fmt: skip
        with SocketCreator(str(policy), audit_sink=sink) as creator:
            for _ in range(200):  # warm up
                creator.create("udp", "127.0.0.1", PORT).close()
            t0 = time.perf_counter_ns()
            for _ in range(args.count):
                creator.create("udp", "127.0.0.1", PORT).close()
            plain = (time.perf_counter_ns() - t0) / args.count / 1000
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.count):
                creator.create("udp", "127.0.0.1", PORT).close()
            prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(args.top)
    print(f"sink {args.sink}: {plain:.1f} µs per create+close without the profiler")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
