"""docs/recipes.md, run as written: nginx on a socket from `privsock exec`
through its NGINX variable, and systemd-socket-proxyd in front of a server
that can take no fd. Both serve as an unprivileged user holding nothing."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from privsock.helper.procstatus import parse_status

from .conftest import REPO
from .helper_proc import proc_status, stop

RECIPES = REPO / "docs" / "recipes.md"
PRIVSOCK = str(Path(sys.executable).with_name("privsock"))
NGINX = "/usr/sbin/nginx"
PROXYD = "/lib/systemd/systemd-socket-proxyd"
DOC_DIR = "/run/nginx-privsock"
# Privileged ports in the test policy that no other test binds: HTTP/1.0
# servers close first, and their TIME_WAIT would make another test's bind of
# the same port (without SO_REUSEADDR) fail with EADDRINUSE.
PORT, BACKEND = 1020, 8021

pytestmark = pytest.mark.root


def _block(lang: str, index: int = 0) -> str:
    return re.findall(rf"^```{lang}\n(.*?)^```", RECIPES.read_text(), re.S | re.M)[index]


def _local(conf: str, work: Path) -> str:
    """The documented configuration, on this test's directory and port."""
    return conf.replace(DOC_DIR, str(work)).replace("0.0.0.0:80", f"127.0.0.1:{PORT}")


def _get(port: int, timeout: float = 20.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return b"".join(iter(lambda: conn.recv(4096), b""))
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is missing: scripts/bootstrap --dev installs it")


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A directory the unprivileged servers can reach (pytest's is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="privsock-recipes-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serving() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(*argv: str, **kw: object) -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                **kw)  # type: ignore[call-overload]  # fmt: skip
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop(proc)


def _unprivileged(pid: int) -> None:
    status = parse_status(proc_status(pid))
    assert 0 not in status.uids
    assert status.caps == dict.fromkeys(("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), 0)
    assert status.no_new_privs == 1


def _exec_argv(policy: Path, listen: str, user: str) -> list[str]:
    return [PRIVSOCK, "exec", "--policy", str(policy), "--user", user, "--listen", listen, "--"]


def test_nginx_takes_its_socket_through_NGINX(
    test_policy: Path, shared: Path, serving: Callable[..., subprocess.Popen[str]]
) -> None:
    _require(NGINX)
    conf_text = _block("nginx")
    command = _block("sh")
    assert "env 'NGINX=3;' nginx -e stderr -c /etc/nginx/privsock.conf" in command
    work = shared / "nginx"
    work.mkdir()
    shutil.chown(work, "privsock-demo")
    conf = work / "privsock.conf"
    conf.write_text(_local(conf_text, work))
    nginx = serving(*_exec_argv(test_policy, f"tcp:127.0.0.1:{PORT}", "privsock-demo"),
                    "env", "NGINX=3;", NGINX, "-e", "stderr", "-c", str(conf))  # fmt: skip
    reply = _get(PORT)
    assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b"hello\n"), reply
    _unprivileged(nginx.pid)  # exec kept the pid: this is nginx's master
    nginx.terminate()
    _, err = nginx.communicate(timeout=10)
    assert 'using inherited sockets from "3;"' in err


def test_nginx_without_NGINX_cannot_bind(
    test_policy: Path, shared: Path, serving: Callable[..., subprocess.Popen[str]]
) -> None:
    # The control: the same nginx, same user, without the variable, binds by
    # itself and the kernel refuses it.
    _require(NGINX)
    work = shared / "nginx"
    work.mkdir()
    shutil.chown(work, "privsock-demo")
    conf = work / "privsock.conf"
    conf.write_text(_local(_block("nginx"), work))
    nginx = serving(*_exec_argv(test_policy, f"tcp:127.0.0.1:{PORT}", "privsock-demo"),
                    NGINX, "-e", "stderr", "-c", str(conf))  # fmt: skip
    _, err = nginx.communicate(timeout=30)
    assert nginx.returncode != 0
    assert "(13: Permission denied)" in err, err


def test_socket_proxyd_in_front_of_a_server_without_fd(
    test_policy: Path, shared: Path, serving: Callable[..., subprocess.Popen[str]]
) -> None:
    if not Path(PROXYD).exists():
        pytest.fail(f"{PROXYD} is missing: scripts/bootstrap --dev installs Debian's systemd")
    command = _block("sh", 1)
    assert f"{PROXYD} 127.0.0.1:8080" in command
    (shared / "index.html").write_text("served by a plain server\n")
    shared.chmod(0o755)
    backend = serving("runuser", "-u", "nobody", "--", sys.executable, "-I", "-m", "http.server",
                      "--bind", "127.0.0.1", "--directory", str(shared), str(BACKEND))  # fmt: skip
    assert _get(BACKEND).endswith(b"served by a plain server\n")
    proxy = serving(*_exec_argv(test_policy, f"tcp:127.0.0.1:{PORT}", "nobody"), PROXYD,
                    f"127.0.0.1:{BACKEND}")  # fmt: skip
    reply = _get(PORT)
    assert reply.startswith(b"HTTP/1.0 200 OK") and reply.endswith(b"served by a plain server\n")
    _unprivileged(proxy.pid)
    assert backend.poll() is None
