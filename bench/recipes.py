"""The cost of docs/recipes.md's two recipes, as ratios against baselines
measured in the same run:

    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python bench/recipes.py'

  nginx     one HTTP/1.0 request per new connection to an nginx that got its
            socket from `privsock exec` (NGINX="3;", running as privsock),
            against the same nginx started as root binding the port itself;
            and the time from launch to the first answer of each.
  proxyd    the same request through systemd-socket-proxyd (started by
            `privsock exec` on the privileged port) in front of that nginx,
            against the request straight to the nginx; and the proxy's RSS.

Needs root, nginx (scripts/bootstrap --dev) and systemd-socket-proxyd (Debian's
systemd). Every kind runs in every round in a shuffled order; a round's figure
is the median of its batch, and the table shows the median of the rounds'
figures with their min-max. The table goes to stdout and bench/RECIPES_LAST_RUN.md.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout

from bench.fixtures import bench_policy
from tests.helper_proc import stop

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PRIVSOCK = REPO / ".venv" / "bin" / "privsock"
PROXYD = "/lib/systemd/systemd-socket-proxyd"
NGINX = "/usr/sbin/nginx"
USER = "privsock"
# In policy/examples/bench.toml's 900-929; bench/run.py uses 900-922.
PORT = {"root": 925, "privsock": 926, "proxyd": 927}
OUT = BENCH / "RECIPES_LAST_RUN.md"
DASH, TIMES = "\u2013", "\u00d7"  # the table's en dash and multiplication sign

NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "hello\\n"; }}
    }}
}}
"""


def request(port: int) -> float:
    """One request on a new connection: seconds from connect to the last byte."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        while conn.recv(4096):
            pass
    return time.perf_counter() - start


def wait_answer(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            request(port)
            return
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"recipes: {proc.args} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                sys.exit(f"recipes: nothing answers on port {port}")
            time.sleep(0.002)


def nginx_conf(prefix: Path, port: int) -> Path:
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port))
    shutil.chown(prefix, USER)
    return conf


def nginx_argv(prefix: Path, conf: Path) -> list[str]:
    return [NGINX, "-e", "stderr", "-p", str(prefix), "-c", str(conf)]


def start(kind: str, policy: Path, work: Path) -> subprocess.Popen[bytes]:
    """The server of one kind, as docs/recipes.md starts it."""
    port = PORT[kind]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    exec_ = [str(PRIVSOCK), "exec", "--policy", str(policy), "--user", USER,
             "--audit-log", f"file:{work / 'audit.log'}", "--listen", f"tcp:127.0.0.1:{port}", "--"]
    if kind == "root":
        prefix = work / f"nginx-root-{time.monotonic_ns()}"
        return subprocess.Popen(nginx_argv(prefix, nginx_conf(prefix, port)), **quiet)
    if kind == "privsock":
        prefix = work / f"nginx-privsock-{time.monotonic_ns()}"
        conf = nginx_conf(prefix, port)
        return subprocess.Popen([*exec_, "env", "NGINX=3;", *nginx_argv(prefix, conf)], **quiet)
    return subprocess.Popen([*exec_, PROXYD, f"127.0.0.1:{PORT['root']}"], **quiet)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}{DASH}{fmt(max(values))})"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def ratio(value: float) -> str:
    return f"{value:.2f}{TIMES}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=300)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("recipes: run as root (nginx as root is the baseline; privsock exec needs it)")
    for tool in (NGINX, PROXYD, str(PRIVSOCK)):
        if not os.access(tool, os.X_OK):
            sys.exit(f"recipes: {tool} is missing (scripts/bootstrap --dev)")
    load_start = os.getloadavg()[0]
    per_request: dict[str, list[float]] = {k: [] for k in PORT}
    startup: dict[str, list[float]] = {"root": [], "privsock": []}
    with bench_policy() as policy, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.chown(work, USER)
        work.chmod(0o755)
        # Start-up: launch to the first answer, each kind in turn.
        for _ in range(args.rounds):
            for kind in random.sample(list(startup), len(startup)):
                began = time.perf_counter()
                proc = start(kind, policy, work)
                wait_answer(PORT[kind], proc)
                startup[kind].append(time.perf_counter() - began)
                stop(proc)
        procs = {kind: start(kind, policy, work) for kind in PORT}
        try:
            for kind, proc in procs.items():
                wait_answer(PORT[kind], proc)
            for _ in range(args.rounds):
                for kind in random.sample(list(PORT), len(PORT)):
                    times = [request(PORT[kind]) for _ in range(args.batch)]
                    per_request[kind].append(statistics.median(times))
            proxyd_rss = rss_kib(procs["proxyd"].pid)
        finally:
            for proc in procs.values():
                stop(proc)
    nginx_ratio = [p / r for p, r in zip(per_request["privsock"], per_request["root"], strict=True)]
    proxy_ratio = [p / r for p, r in zip(per_request["proxyd"], per_request["root"], strict=True)]
    start_ratio = [p / r for p, r in zip(startup["privsock"], startup["root"], strict=True)]
    extra = [p - r for p, r in zip(startup["privsock"], startup["root"], strict=True)]
    rows = [
        ("request, nginx bound by itself as root (baseline)", spread(per_request["root"], us)),
        ("request, nginx on a socket from `privsock exec` (NGINX=\"3;\")",
         spread(per_request["privsock"], us)),
        ("**ratio nginx via privsock / baseline**", spread(nginx_ratio, ratio)),
        ("request through systemd-socket-proxyd to that nginx", spread(per_request["proxyd"], us)),
        ("**ratio through systemd-socket-proxyd / baseline**", spread(proxy_ratio, ratio)),
        ("start-up to the first answer, nginx as root", spread(startup["root"], ms)),
        ("start-up to the first answer, `privsock exec` + nginx", spread(startup["privsock"], ms)),
        ("**start-up ratio privsock exec / root**", spread(start_ratio, ratio)),
        ("start-up added by `privsock exec`", spread(extra, ms)),
        ("systemd-socket-proxyd RSS", f"{proxyd_rss / 1024:.1f} MiB"),
    ]
    table = [f"| measure | median (min{DASH}max of rounds) |", "| --- | --- |"]
    table += [f"| {name} | {value} |" for name, value in rows]
    text = (
        f"# docs/recipes.md: last run of bench/recipes.py\n\n"
        f"{args.rounds} rounds, {args.batch} requests per kind and round, each on a new "
        f"connection; load {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
        f"{os.cpu_count()} cores.\n\n" + "\n".join(table) + "\n"
    )
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
