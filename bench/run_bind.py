"""What `privsock run` costs a program per bind(), next to authbind, in one run.

    .venv/bin/python bench/run_bind.py [--rounds N] [--batch N]   (part of make bench)

One worker program (bench/authbind_worker.py: socket+bind+close in a loop,
timing each) runs as user nobody, kept running, in three set-ups:

  plain        no supervisor, an unprivileged port: the baseline bind;
  run          under `privsock run`: an unprivileged port (the filter sends the
               bind to the supervisor, which answers CONTINUE) and a privileged
               port (served by the helper: read, pidfd_getfd, helper round trip,
               options, ADDFD, SEND);
  authbind     `authbind --deep` on a privileged port (a fork+exec of its setuid
               helper per bind).

Every round measures every case, in a shuffled order, so a noisy neighbour
hits all of them alike; a round's figure is the median of its batch, the
table the median of the rounds (with min-max), and each ratio is taken round
by round. Targets: a served bind at most half of authbind's cost.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORKER = BENCH / "authbind_worker.py"
POLICY_SOURCE = REPO / "policy" / "examples" / "bench.toml"
PRIVSOCK = Path(sys.executable).with_name("privsock")
PY = "/usr/bin/python3"  # Debian's: user nobody can run it
USER = "nobody"
# policy/examples/bench.toml grants 900-929; bench/run.py uses up to 922.
PORT_RUN, PORT_AUTHBIND = 925, 926
PORT_FREE = 8925  # unprivileged: the CONTINUE path and the baseline
AUTHBIND_FILE = Path("/etc/authbind/byport") / f"!{PORT_AUTHBIND}"


class BenchError(Exception):
    pass


class Worker:
    def __init__(self, argv: list[str], name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)  # fmt: skip

    def binds(self, transport: str, port: int, count: int) -> list[int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{transport} 4 {port} {count}\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline() or '{"error": "worker died"}')
        if isinstance(answer, dict):
            raise BenchError(f"{self.name} {transport}:{port}: {answer['error']}")
        return [int(x) for x in answer]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def setup() -> Iterator[Path]:
    """The bench policy in a root-only directory; authbind's byport file for
    PORT_AUTHBIND (what was there is put back)."""
    tmp = Path(tempfile.mkdtemp(prefix="privsock-bench-run-"))
    saved = AUTHBIND_FILE.read_bytes() if AUTHBIND_FILE.exists() else None
    try:
        policy = tmp / "bench.toml"
        shutil.copyfile(POLICY_SOURCE, policy)
        policy.chmod(0o644)
        AUTHBIND_FILE.parent.mkdir(parents=True, exist_ok=True)
        AUTHBIND_FILE.write_bytes(b"")
        AUTHBIND_FILE.chmod(0o755)  # authbind lets whoever may execute it bind
        yield policy
    finally:
        AUTHBIND_FILE.unlink(missing_ok=True)
        if saved is not None:
            AUTHBIND_FILE.write_bytes(saved)
        shutil.rmtree(tmp)


CASES = [
    # (key, label, worker, port)
    ("plain", "no supervisor, unprivileged port (baseline)", "plain", PORT_FREE),
    ("continue", "`privsock run`, unprivileged port (CONTINUE)", "run", PORT_FREE),
    ("served", "`privsock run`, privileged port (served by the helper)", "run", PORT_RUN),
    ("authbind", "authbind --deep, privileged port", "authbind", PORT_AUTHBIND),
]


def measure(rounds: int, batch: int) -> dict[str, dict[str, list[float]]]:
    """µs per socket+bind+close: {transport: {case: [median of each round]}}."""
    if os.geteuid() != 0:
        raise BenchError("run as root (it starts the helper and sets up authbind)")
    for tool in ("authbind", "runuser"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is missing: scripts/bootstrap --bench installs it")
    worker = [PY, "-I", str(WORKER)]
    results: dict[str, dict[str, list[float]]] = {
        t: {key: [] for key, *_ in CASES} for t in ("udp", "tcp")
    }
    with setup() as policy:
        workers = {
            "plain": Worker(["runuser", "-u", USER, "--", *worker], "plain"),
            "run": Worker([str(PRIVSOCK), "run", "--policy", str(policy), "--user", USER,
                           "--audit-log", "file:/dev/null", "--", *worker], "run"),
            "authbind": Worker(["runuser", "-u", USER, "--", "authbind", "--deep", *worker],
                               "authbind"),
        }  # fmt: skip
        try:
            for transport in ("udp", "tcp"):  # warm up every path once
                for _key, _label, name, port in CASES:
                    workers[name].binds(transport, port, 5)
            for _ in range(rounds):
                order = [(t, c) for t in ("udp", "tcp") for c in CASES]
                random.shuffle(order)
                for transport, (key, _label, name, port) in order:
                    n = batch if key != "authbind" else max(5, batch // 4)
                    samples = workers[name].binds(transport, port, n)
                    results[transport][key].append(statistics.median(samples) / 1000)
        finally:
            for w in workers.values():
                w.close()
    return results


def table(results: dict[str, dict[str, list[float]]], rounds: int) -> list[str]:
    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    lines = [
        "| µs per socket+bind+close, IPv4, as user nobody | UDP | TCP |",
        "|---|---|---|",
    ]
    for key, label, _name, _port in CASES:
        lines.append(f"| {label} | {cell(results['udp'][key])} | {cell(results['tcp'][key])} |")

    def ratio(a: str, b: str, t: str) -> list[float]:
        return [x / y for x, y in zip(results[t][a], results[t][b], strict=True)]

    def added(t: str) -> list[float]:
        return [x - y for x, y in zip(results[t]["continue"], results[t]["plain"], strict=True)]

    served = [r for t in ("udp", "tcp") for r in ratio("served", "authbind", t)]
    met = "yes" if max(statistics.median(ratio("served", "authbind", t))
                       for t in ("udp", "tcp")) <= 0.5 else "**no**"  # fmt: skip
    lines += [
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| a served privileged bind ≤ ½ of authbind's (median of the per-round ratios, "
        f"UDP / TCP) | {statistics.median(ratio('served', 'authbind', 'udp')):.2f} / "
        f"{statistics.median(ratio('served', 'authbind', 'tcp')):.2f} "
        f"(rounds {min(served):.2f}-{max(served):.2f}) | {met} |",
        "",
        f"Cost the filter adds to an unprivileged bind (CONTINUE minus the baseline, median "
        f"of the rounds): UDP {statistics.median(added('udp')):.1f} µs, "
        f"TCP {statistics.median(added('tcp')):.1f} µs. {rounds} rounds.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=40)
    args = parser.parse_args()
    try:
        results = measure(args.rounds, args.batch)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    head = (
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"Linux {platform.release()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    lines = ["# `privsock run`: the cost per bind() (bench/run_bind.py)", "", head, "",
             *table(results, args.rounds)]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    (BENCH / "LAST_RUN_BIND.md").write_text(text)


if __name__ == "__main__":
    main()
