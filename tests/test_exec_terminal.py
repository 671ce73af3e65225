"""`privsock exec` started from a terminal, as `make run` is: a real pty is the
launcher's stdio and controlling terminal. The server must not be able to push
input into that terminal (TIOCSTI), read what is typed there, or reach it
through /dev/tty or the relay's /proc fds; Ctrl-C must still stop it cleanly,
and LISTEN_PID must still be the server's pid."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import re
import select
import signal
import socket
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from privsock.detach import controlling_tty

from .conftest import REPO
from .test_make_run import make_run_command

PRIVSOCK = str(Path(sys.executable).with_name("privsock"))
pytestmark = pytest.mark.root

# The hostile server: every way at the terminal it can think of, as JSON.
ATTACK = r"""
import ctypes, fcntl, json, os, termios, time
res = {}
for fd in (0, 1, 2):
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b"X")
        res[f"tiocsti_fd{fd}"] = "injected"
    except OSError as e:
        res[f"tiocsti_fd{fd}"] = e.errno
try:
    tty = os.open("/dev/tty", os.O_RDWR)
    fcntl.ioctl(tty, termios.TIOCSTI, b"Y")
    res["dev_tty"] = "injected"
except OSError as e:
    res["dev_tty"] = e.errno
try:
    os.set_blocking(0, False)
    res["read_stdin"] = os.read(0, 100).decode()
except OSError as e:
    res["read_stdin"] = e.errno
relay = os.getppid()
# Wait until the relay has dropped to our uid: only then could it be ours to take.
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    with open(f"/proc/{relay}/status") as f:
        if f"Uid:\t{os.getuid()}\t" in f.read():
            break
    time.sleep(0.01)
for fd in (0, 1, 2):
    try:
        os.open(f"/proc/{relay}/fd/{fd}", os.O_RDWR)
        res[f"relay_fd{fd}"] = "opened"
    except OSError as e:
        res[f"relay_fd{fd}"] = e.errno
# pidfd_getfd(2): a copy of the relay's terminal fd, which could read the keyboard.
libc = ctypes.CDLL(None, use_errno=True)
relay_pidfd = os.pidfd_open(relay)
for fd in (0, 1, 2):
    got = libc.syscall(438, relay_pidfd, fd, 0)
    res[f"relay_getfd{fd}"] = "stolen" if got >= 0 else ctypes.get_errno()
try:
    os.setpgid(0, os.getpgid(relay))
    res["join_relay_group"] = "joined"
except OSError as e:
    res["join_relay_group"] = e.errno
with open("/proc/self/stat") as f:
    res["stat"] = f.read()
res["isatty"] = [os.isatty(fd) for fd in (0, 1, 2)]
res["pid"], res["sid"], res["relay"] = os.getpid(), os.getsid(0), relay
res["listen_pid"] = os.environ.get("LISTEN_PID")
print("RESULT " + json.dumps(res), flush=True)
"""


@dataclass
class Terminal:
    """A pty whose slave is a launched process's stdio and controlling terminal."""

    master: int
    slave: int
    proc: subprocess.Popen[bytes]
    seen: bytes = b""

    def read_until(self, pattern: bytes, within: float = 60.0) -> re.Match[bytes]:
        deadline = time.monotonic() + within
        while (found := re.search(pattern, self.seen)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {within}s; got:\n{self.seen!r}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # EIO: every slave fd is closed
                    raise AssertionError(
                        f"terminal closed before {pattern!r}:\n{self.seen!r}"
                    ) from None
            elif self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"exited before {pattern!r}; got:\n{self.seen!r}")
        return found

    def wait(self, within: float = 60.0) -> int:
        """The launcher's exit status, with everything it wrote read."""
        code = self.proc.wait(timeout=within)
        while select.select([self.master], [], [], 0.2)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.seen += chunk
        return code

    def pending_input(self) -> bytes:
        """What is waiting in the terminal's input queue (raw mode only)."""
        os.set_blocking(self.slave, False)
        try:
            return os.read(self.slave, 4096)
        except BlockingIOError:
            return b""


def _make_controlling_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


StartTerminal = Callable[..., Terminal]


@pytest.fixture
def terminal_factory() -> Iterator[StartTerminal]:
    started: list[Terminal] = []

    def start(argv: list[str], *, raw: bool, typed: bytes = b"", cwd: Path = REPO) -> Terminal:
        master, slave = os.openpty()
        if raw:
            tty.setraw(slave)
        os.write(master, typed)
        proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
            start_new_session=True, preexec_fn=_make_controlling_terminal,
        )  # fmt: skip
        term = Terminal(master, slave, proc)
        started.append(term)
        return term

    yield start
    for term in started:
        if term.proc.poll() is None:
            os.killpg(term.proc.pid, signal.SIGKILL)
            term.proc.wait(timeout=30)
        os.close(term.master)
        os.close(term.slave)


def test_the_server_cannot_inject_into_or_read_the_terminal(
    terminal_factory: StartTerminal, test_policy: Path
) -> None:
    # Raw mode: no echo, and the input queue can be read back exactly.
    term = terminal_factory(
        [PRIVSOCK, "exec", "--policy", str(test_policy), "--user", "privsock-demo",
         "--listen", "udp:127.0.0.1:1022", "--", sys.executable, "-I", "-c", ATTACK],
        raw=True, typed=b"root's typed secret",
    )  # fmt: skip
    res = json.loads(term.read_until(rb"RESULT (\{.*\})\r?\n").group(1))
    assert term.wait() == 0, term.seen
    # Every way in failed: no terminal on stdio, none to open as /dev/tty.
    assert res["isatty"] == [False, False, False]
    for fd in (0, 1, 2):
        assert res[f"tiocsti_fd{fd}"] == errno.ENOTTY, res
    assert res["dev_tty"] == errno.ENXIO, res
    assert res["read_stdin"] == "", res  # /dev/null, not the keyboard
    # The relay shares the server's uid but is not dumpable: its fds are not
    # the server's to open through /proc or to copy with pidfd_getfd.
    for fd in (0, 1, 2):
        assert res[f"relay_fd{fd}"] == errno.EACCES, res
        assert res[f"relay_getfd{fd}"] == errno.EPERM, res
    # Another session: it cannot join the terminal's foreground group.
    assert res["join_relay_group"] == errno.EPERM, res
    assert res["sid"] == res["pid"]
    assert controlling_tty(res["stat"]) == 0
    assert res["listen_pid"] == str(res["pid"])
    assert res["relay"] == term.proc.pid  # the process the shell waits for relays
    # Nothing was injected and nothing typed was consumed.
    assert term.pending_input() == b"root's typed secret"


def test_ctrl_c_in_make_runs_terminal_stops_the_service_cleanly(
    terminal_factory: StartTerminal,
) -> None:
    term = terminal_factory(make_run_command(), raw=False)
    term.read_until(rb"privsock echo: serving")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(10)
        udp.sendto(b"hi\n", ("127.0.0.1", 53))
        banner = udp.recv(65535).decode()
    server = int(re.match(r"privsock echo: I am pid (\d+),", banner).group(1))  # type: ignore[union-attr]
    relay = term.proc.pid
    assert server != relay
    # The echo service checks LISTEN_PID against its own pid before serving.
    env = Path(f"/proc/{server}/environ").read_bytes().split(b"\0")
    assert f"LISTEN_PID={server}".encode() in env
    with open(f"/proc/{server}/stat") as f:
        assert controlling_tty(f.read()) == 0
    assert os.getsid(server) == server
    # The relay holds no privilege either, and is not dumpable (/proc says root).
    user = pwd.getpwnam("privsock-demo")
    status = Path(f"/proc/{relay}/status").read_text()
    assert re.search(rf"^Uid:\t{user.pw_uid}\t{user.pw_uid}\t{user.pw_uid}\t", status, re.M)
    assert re.search(r"^CapBnd:\t0000000000000000$", status, re.M)
    assert re.search(r"^NoNewPrivs:\t1$", status, re.M)
    assert os.stat(f"/proc/{relay}/fd").st_uid == 0
    assert os.stat(f"/proc/{server}/fd").st_uid == user.pw_uid

    os.write(term.master, b"\x03")  # Ctrl-C: SIGINT to the terminal's foreground group
    assert term.wait() == 0, term.seen
    assert b"privsock echo: stopped by SIGINT" in term.seen
    assert b"Traceback" not in term.seen
    assert not Path(f"/proc/{server}").exists()


def test_a_server_killed_by_a_signal_kills_the_relay_with_it(
    terminal_factory: StartTerminal, test_policy: Path
) -> None:
    term = terminal_factory(
        [PRIVSOCK, "exec", "--policy", str(test_policy), "--user", "privsock-demo",
         "--listen", "udp:127.0.0.1:1022", "--", sys.executable, "-I", "-c",
         "import os, signal; print('up', flush=True); os.kill(os.getpid(), signal.SIGUSR1)"],
        raw=False,
    )  # fmt: skip
    term.read_until(b"up")
    assert term.wait() == -signal.SIGUSR1


def test_without_a_terminal_the_server_is_the_launcher_itself(test_policy: Path) -> None:
    # No terminal on stdio, no controlling terminal: nothing to split, exec in place.
    result = subprocess.run(
        [PRIVSOCK, "exec", "--policy", str(test_policy), "--user", "privsock-demo",
         "--listen", "udp:127.0.0.1:1022", "--", sys.executable, "-I", "-c",
         "import os; print(os.getpid(), os.environ['LISTEN_PID'])"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        start_new_session=True, check=False,
    )  # fmt: skip
    proc_pid, listen_pid = result.stdout.split()
    assert result.returncode == 0, result.stderr
    assert proc_pid == listen_pid


@pytest.mark.parametrize(
    ("stat", "tty_nr"),
    [
        ("12 (python3) S 1 12 12 34816 12 4194560 0 0", 34816),
        ("12 (a b) c) (d) S 1 12 12 0 -1 4194560 0 0", 0),
    ],
)
def test_controlling_tty_is_read_after_the_last_parenthesis(stat: str, tty_nr: int) -> None:
    assert controlling_tty(stat) == tty_nr


def test_controlling_tty_refuses_a_short_line() -> None:
    with pytest.raises(ValueError, match="not a /proc/PID/stat line"):
        controlling_tty("12 (x) S 1")
