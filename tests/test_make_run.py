"""`make run`'s own command (read from the Makefile with `make -n`, so the two
cannot drift): the echo service on 127.0.0.1:53, UDP and TCP, as the privsock-demo
user, with real clients; Ctrl-C stops it cleanly."""

from __future__ import annotations

import os
import pwd
import selectors
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import IO

import pytest

from .conftest import REPO

pytestmark = pytest.mark.root

USER = pwd.getpwnam("privsock-demo")


def make_run_command() -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("POLICY", "MAKEFLAGS", "MAKELEVEL")}
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "run"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    commands = [line for line in out.replace("\\\n", " ").splitlines() if " exec " in line]
    assert len(commands) == 1, out
    return shlex.split(commands[0])


def read_until(stream: IO[bytes], marker: bytes, within: float = 30.0) -> bytes:
    """What ``stream`` says up to ``marker``, bounded in time. Unbuffered reads, so
    that nothing is left in a buffer that select() cannot see."""
    seen = b""
    deadline = time.monotonic() + within
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while marker not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"no {marker!r} within {within}s; got:\n{seen!r}")
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"stream ended before {marker!r}; got:\n{seen!r}")
            seen += chunk
    return seen


@pytest.fixture
def service(root: None) -> Iterator[subprocess.Popen[bytes]]:
    cmd = make_run_command()
    assert cmd[:2] == [".venv/bin/privsock", "exec"] and "policy/default.toml" in cmd
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal's job is
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        read_until(proc.stderr, b"privsock echo: serving")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def check_banner(banner: str, pid: int) -> None:
    assert banner.startswith(
        f"privsock echo: I am pid {pid}, user privsock-demo (uid {USER.pw_uid})"
    )
    assert f"group privsock-demo (gid {USER.pw_gid})" in banner
    assert "I hold no privilege: CapEff=0 CapPrm=0 CapBnd=0 NoNewPrivs=1." in banner


def test_make_run_serves_udp_and_tcp_and_stops_on_ctrl_c(
    service: subprocess.Popen[bytes],
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(10)
        udp.sendto(b"hello over udp\n", ("127.0.0.1", 53))
        reply = udp.recv(65535).decode()
    banner, echoed = reply.split("\n", 1)
    check_banner(banner, service.pid)  # exec kept the pid: the service is that process
    assert echoed == "hello over udp\n"

    with socket.create_connection(("127.0.0.1", 53), timeout=10) as tcp:
        stream = tcp.makefile("rwb", buffering=0)
        check_banner(stream.readline().decode(), service.pid)
        for line in (b"hello over tcp\n", b"and again\n"):
            tcp.sendall(line)
            assert stream.readline() == line

    # Ctrl-C: SIGINT to the whole foreground process group.
    os.killpg(service.pid, signal.SIGINT)
    err = service.communicate(timeout=30)[1].decode()
    assert service.returncode == 0, err
    assert "privsock echo: stopped by SIGINT" in err
    assert "Traceback" not in err


def test_sigterm_stops_it_too(service: subprocess.Popen[bytes]) -> None:
    service.send_signal(signal.SIGTERM)
    err = service.communicate(timeout=30)[1].decode()
    assert service.returncode == 0, err
    assert "privsock echo: stopped by SIGTERM" in err
    # The sockets went with it: port 53 binds again.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", 53))
