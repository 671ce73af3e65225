"""SocketCreator(connect=PATH): the boss connects to a socket-activated helper
(systemd Accept=yes), so the boss itself needs no privilege at all. The
acceptor here does what systemd does: one helper per connection, the
connection as its fd 0."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from privsock.client import SocketCreator
from privsock.errors import HelperDied, HelperStartError, PolicyDenied
from privsock.helperprocess import HELPER_ENV, default_helper_argv

from .helper_proc import FRESH_NETNS

pytestmark = pytest.mark.root


class Acceptor:
    def __init__(self, path: Path, policy: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(path))
        os.chmod(path, 0o666)
        self.listener.listen(4)
        self.policy = policy
        self.helpers: list[subprocess.Popen[bytes]] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self.helpers.append(subprocess.Popen(
                    [*FRESH_NETNS, *default_helper_argv(), "--policy", str(self.policy)],
                    stdin=conn.fileno(), stderr=subprocess.DEVNULL, env=HELPER_ENV,
                ))  # fmt: skip

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=5)
        for proc in self.helpers:
            proc.kill()
            proc.wait()


@pytest.fixture
def acceptor(root: None, test_policy: Path) -> Iterator[tuple[Acceptor, Path]]:
    # Not under tmp_path: its parents are 0700, and the unprivileged boss must reach it.
    folder = Path(tempfile.mkdtemp(prefix="privsock-connect-"))
    folder.chmod(0o755)
    path = folder / "helper.sock"
    acc = Acceptor(path, test_policy)
    yield acc, path
    acc.close()
    shutil.rmtree(folder)


def test_connected_helper_grants_and_denies(acceptor: tuple[Acceptor, Path]) -> None:
    acc, path = acceptor
    with SocketCreator(connect=str(path), audit_sink=None) as c:
        assert c.pid is None  # not our child
        with c.create("udp", "127.0.0.1", 53) as s:
            assert s.getsockname() == ("127.0.0.1", 53)
        with pytest.raises(PolicyDenied):
            c.create("tcp", "127.0.0.1", 22)
    assert acc.helpers[0].wait(timeout=5) == 0  # EOF: it exited cleanly


def test_a_dead_connected_helper_is_replaced_by_reconnecting(
    acceptor: tuple[Acceptor, Path],
) -> None:
    acc, path = acceptor
    with SocketCreator(connect=str(path), audit_sink=None) as c:
        c.ping()
        os.kill(acc.helpers[0].pid, signal.SIGKILL)
        with pytest.raises(HelperDied):
            c.ping()
        c.create("udp", "127.0.0.1", 1011).close()
    assert len(acc.helpers) == 2


UNPRIVILEGED_BOSS = """
import os, sys
from privsock.client import SocketCreator
assert os.getuid() != 0
with SocketCreator(connect=sys.argv[1], audit_sink=None) as c:
    s = c.create("tcp", "127.0.0.1", 80)
    print(s.getsockname()[1])
    s.close()
"""


def test_the_boss_needs_no_privilege(acceptor: tuple[Acceptor, Path]) -> None:
    _, path = acceptor
    result = subprocess.run(
        [sys.executable, "-c", UNPRIVILEGED_BOSS, str(path)], user="nobody", group="nogroup",
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "80"


def test_nothing_listening_is_a_clear_start_error(tmp_path: Path) -> None:
    with pytest.raises(HelperStartError, match=r"cannot connect to .*No such file"):
        SocketCreator(connect=str(tmp_path / "nothing.sock"), audit_sink=None).start()


def test_policy_and_connect_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="either a policy file"):
        SocketCreator(str(tmp_path / "p.toml"), connect=str(tmp_path / "s"))
    with pytest.raises(ValueError, match="either a policy file"):
        SocketCreator()
