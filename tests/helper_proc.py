"""Test utilities: a helper process driven with raw bytes (also the live
fuzzer's and the bench's), and /proc readings."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from privsock import auditjson
from privsock.helper import protocol
from privsock.helper.protocol import REPLY_SIZE
from privsock.helperprocess import HELPER_ENV, default_helper_argv

# A helper that binds in a network namespace of its own, with only loopback up,
# cannot be failed by a port that another test's server left in TIME_WAIT
# (127.0.0.1:80, 0.0.0.0:80). `unshare` and `sh` exec into the helper: its pid
# and parent stay the caller's.
FRESH_NETNS = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


class HelperChannel:
    """A helper process (or any program that speaks the protocol on fd 0) on a
    SOCK_SEQPACKET channel driven with raw bytes: the one raw-channel driver of
    the tests, the live fuzzer (fuzz/live.py) and the bench (bench/run.py).
    ``stderr`` is where the process's stderr goes: a pipe (``.proc.stderr``) by
    default, or a file."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        stderr: int | IO[bytes] = subprocess.PIPE,
        timeout: float | None = 10.0,
    ) -> None:
        self.chan, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(
            list(argv), stdin=theirs, stdout=subprocess.DEVNULL, stderr=stderr,
            env=HELPER_ENV, close_fds=True,
        )  # fmt: skip
        theirs.close()
        self.chan.settimeout(timeout)

    @classmethod
    def for_policy(cls, policy: Path, argv: Sequence[str] | None = None) -> HelperChannel:
        """privsock's helper (or ``argv``) started with ``--policy policy``."""
        return cls([*(argv or default_helper_argv()), "--policy", str(policy)])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, data: bytes, fds: Sequence[int] = (), creds: bool = False) -> None:
        """One message; ``fds`` as SCM_RIGHTS, ``creds`` adds our SCM_CREDENTIALS."""
        anc = []
        if fds:
            anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
        if creds:
            ucred = struct.pack("iII", os.getpid(), os.getuid(), os.getgid())
            anc.append((socket.SOL_SOCKET, socket.SCM_CREDENTIALS, ucred))
        self.chan.sendmsg([data], anc)

    def recv(self) -> tuple[bytes, list[int], int]:
        """One message (up to 64 bytes more than a reply, to see an over-long one),
        the fds it carried and recvmsg's flags."""
        data, anc, flags, _ = self.chan.recvmsg(
            REPLY_SIZE + 64, socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC
        )
        return data, protocol.received_fds(anc), flags

    def exchange(self, data: bytes, fds: Sequence[int] = ()) -> tuple[bytes, list[int]]:
        self.send(data, fds)
        reply, got, _ = self.recv()
        return reply, got

    def ping_ok(self) -> bool:
        """Whether a PING is answered OK: the helper serves only once hardened."""
        try:
            reply, fds = self.exchange(protocol.encode_request(protocol.Ping(424242)))
        except OSError:
            return False
        return not fds and len(reply) == REPLY_SIZE and (
            protocol.decode_reply(reply).status is protocol.Status.OK
        )

    def reap(self, timeout: float = 5.0) -> int:
        """Wait for the process to exit (kill it after ``timeout``); its status."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return int(self.proc.returncode)

    def audit_lines(self) -> list[dict[str, Any]]:
        """The audit lines the helper has written so far (each comes before its
        reply), read without waiting; its other stderr lines are skipped."""
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        data = self.proc.stderr.read() or b""
        return [auditjson.parse(line) for line in data.splitlines() if line.startswith(b"{")]

    def wait_ready(self) -> None:
        """Serving starts only after hardening; a PING answered means hardened."""
        assert self.ping_ok()

    def close(self) -> int:
        """End of session (the channel closed), the process reaped."""
        self.chan.close()
        code = self.reap()
        if self.proc.stderr:
            self.proc.stderr.close()
        return code


@contextlib.contextmanager
def running(
    argv: Sequence[str], *, stdin: int | None = None, stdout: int = subprocess.PIPE
) -> Iterator[subprocess.Popen[str]]:
    """``argv`` started (text; stderr on a pipe), killed if it still runs when
    the block ends, however it ends, and reaped."""
    proc = subprocess.Popen(list(argv), stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, SIGKILL if it has not exited within ``timeout``; reaped, its
    pipes read to the end."""
    proc.terminate()
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


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


@contextlib.contextmanager
def socket_activated(policy: Path, folder: Path,
                     helper: Sequence[str] = ()) -> Iterator[Path]:  # fmt: skip
    """A helper per connection on FOLDER/helper.sock, as systemd's Accept=yes
    socket starts it; the socket open to every user, as privsock-clients is.
    ``helper``: another program in place of the helper."""
    path = folder / "helper.sock"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "--seqpacket", "-a", "--inetd", "-l", str(path),
         *(helper or default_helper_argv()), "--policy", str(policy)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=HELPER_ENV,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)
        path.chmod(0o666)
        yield path
    finally:
        proc.terminate()
        proc.wait(timeout=10)
