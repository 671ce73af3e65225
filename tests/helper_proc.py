"""Test utilities: a helper process driven with raw bytes, and /proc readings."""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from privsock.helper import auditrecord, protocol
from privsock.helper.protocol import REPLY_SIZE
from privsock.helperprocess import HELPER_ENV, default_helper_argv


class RawHelper:
    """A real helper whose channel the test drives byte by byte."""

    def __init__(self, policy: Path, argv: list[str] | None = None) -> None:
        self.chan, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            [*(argv or default_helper_argv()), "--policy", str(policy)],
            stdin=theirs, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=HELPER_ENV, close_fds=True,
        )
        theirs.close()
        self.chan.settimeout(10)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        self.chan.sendmsg([data], anc)

    def recv(self) -> tuple[bytes, list[int], int]:
        data, anc, flags, _ = self.chan.recvmsg(
            REPLY_SIZE + 64, socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC
        )
        return data, protocol.received_fds(anc), flags

    def exchange(self, data: bytes, fds: list[int] | None = None) -> tuple[bytes, list[int]]:
        self.send(data, fds)
        reply, got, _ = self.recv()
        return reply, got

    def audit_lines(self) -> list[dict[str, Any]]:
        """The audit lines the helper has written so far (each comes before its
        reply), read without waiting; its other stderr lines are skipped."""
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        data = self.proc.stderr.read() or b""
        return [auditrecord.parse(line) for line in data.splitlines() if line.startswith(b"{")]

    def wait_ready(self) -> None:
        """Serving starts only after hardening; a PING answered means hardened."""
        reply, fds = self.exchange(protocol.encode_request(protocol.Ping(424242)))
        assert not fds
        assert protocol.decode_reply(reply).status is protocol.Status.OK

    def close(self) -> int:
        self.chan.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        return self.proc.returncode


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_status(pid: int) -> str:
    return Path(f"/proc/{pid}/status").read_text()


def gone(pid: int, within: float) -> bool:
    """True once pid no longer exists or is a zombie, polled up to `within` s."""
    deadline = time.monotonic() + within
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


PYTHON = sys.executable


# /proc/PID/status of a process that gave up every privilege (a server
# started by privsock exec): non-root, no capability in any set, no_new_privs.
DROPPED_STATUS = """Name:\tpython3
Pid:\t4242
Uid:\t999\t999\t999\t999
Gid:\t995\t995\t995\t995
Groups:\t
NoNewPrivs:\t1
Seccomp:\t0
CapInh:\t0000000000000000
CapPrm:\t0000000000000000
CapEff:\t0000000000000000
CapBnd:\t0000000000000000
CapAmb:\t0000000000000000
"""
