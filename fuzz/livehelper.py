"""The live fuzzer's helper: a real hardened helper in a network namespace of
its own, on the raw test channel (tests/helper_proc.HelperChannel), with its
audit lines counted, and the fds and /proc readings the fuzzer uses."""

from __future__ import annotations

import collections
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tests.helper_proc import HelperChannel

PYTHON = sys.executable
HELPER = [PYTHON, "-I", "-m", "privsock.helper.main"]
REPLY_TIMEOUT = 10.0  # a bound on every wait, far above any real reply time


def netns_argv(argv: list[str] | None = None) -> list[str]:
    """Run a helper in a network namespace of its own with only loopback up.
    `unshare` and `sh` exec into the helper, so its pid and parent stay the same."""
    return [
        "unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
        *(argv or HELPER),
    ]  # fmt: skip


class LiveHelper(HelperChannel):
    """A real helper on the raw test channel; its audit lines are counted."""

    def __init__(self, policy: Path, argv: list[str]) -> None:
        self.started = time.monotonic()
        super().__init__([*argv, "--policy", str(policy)], timeout=REPLY_TIMEOUT)
        self.decisions: collections.Counter[str] = collections.Counter()
        self.messages: list[str] = []
        assert self.proc.stderr is not None
        self.reader = threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True)
        self.reader.start()

    def _drain(self, stream: IO[bytes]) -> None:
        with stream:
            for line in stream:
                try:
                    self.decisions[json.loads(line)["decision"]] += 1
                except (ValueError, KeyError, TypeError):
                    self.messages.append(line.decode("utf-8", "replace").rstrip())

    def end(self, creds: bool = False) -> int | None:
        """The documented end of a session: a zero-length message. Returns the
        exit status, or None if the helper did not exit in time (then it is killed)."""
        try:
            self.send(b"", [], creds)
        except OSError:
            pass  # already gone: its exit status tells how
        try:
            code: int | None = self.proc.wait(timeout=REPLY_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        self.close()
        return code

    def close(self) -> int:
        # The reader owns the stderr pipe: it closes it at end of file.
        self.chan.close()
        code = self.reap(REPLY_TIMEOUT)
        self.reader.join(timeout=REPLY_TIMEOUT)
        return code


@contextmanager
def fd_pool(chan: socket.socket) -> Iterator[list[int]]:
    """Open fds of many kinds; after use, checks they are all still ours and working."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe_r, pipe_w = os.pipe()
        unix_a, unix_b = socket.socketpair()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        epoll = select.epoll()
        plain = [
            os.open(Path(tmp) / "file", os.O_RDWR | os.O_CREAT),
            os.open("/dev/null", os.O_RDONLY),
            os.open(tmp, os.O_RDONLY | os.O_DIRECTORY),
            os.eventfd(0),
            os.memfd_create("privsock-live-fuzz"),
        ]
        pool = [*plain, pipe_r, pipe_w, unix_a.fileno(), unix_b.fileno(), udp.fileno(),
                tcp.fileno(), epoll.fileno(), chan.fileno()]  # fmt: skip
        try:
            yield pool
            # The helper's copies were closed; ours still work.
            os.write(pipe_w, b"x")
            assert os.read(pipe_r, 1) == b"x"
            unix_a.send(b"y")
            assert unix_b.recv(1) == b"y"
        finally:
            for fd in (*plain, pipe_r, pipe_w):
                os.close(fd)
            for s in (unix_a, unix_b, udp, tcp, epoll):
                s.close()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")
