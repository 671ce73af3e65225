"""A helper killed while a request is in flight: that request fails with
HelperDied, the next one gets a new helper, and sockets already handed out
(and cached) keep working."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from privsock.allocator import Share, SocketAllocator
from privsock.client import SocketCreator
from privsock.errors import HelperDied

pytestmark = pytest.mark.root

# x86_64: a socket with a timeout waits for the reply in poll(), then recvmsg().
SYS_POLL, SYS_RECVMSG = 7, 47


def wait_in_syscall(tid: int, numbers: set[int], within: float = 10.0) -> None:
    """Poll until thread ``tid`` of this process is blocked in one of ``numbers``."""
    deadline = time.monotonic() + within
    path = Path(f"/proc/self/task/{tid}/syscall")
    # The file says "running" while the thread is not in a syscall.
    while path.read_text().split()[0] not in {str(n) for n in numbers}:
        assert time.monotonic() < deadline, f"thread {tid} never waited in {numbers}"
        time.sleep(0.005)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall number is x86_64's")
def test_sigkill_mid_flight_fails_that_request_and_the_next_one_restarts(
    test_policy: Path,
) -> None:
    with SocketCreator(str(test_policy), audit_sink=None) as creator:
        alloc = SocketAllocator(creator)
        kept = alloc.get_bound_socket("udp", "127.0.0.1", 1023, share=Share.ANY)
        first = creator.pid
        assert first is not None
        os.kill(first, signal.SIGSTOP)  # the request will wait for a reply
        outcome: list[BaseException | socket.socket] = []
        tid: list[int] = []

        def request() -> None:
            tid.append(threading.get_native_id())
            try:
                outcome.append(creator.create("tcp", "127.0.0.1", 1023))
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=request)
        worker.start()
        while not tid:
            time.sleep(0.001)
        wait_in_syscall(tid[0], {SYS_POLL, SYS_RECVMSG})  # sent, now waiting: in flight
        os.kill(first, signal.SIGKILL)
        worker.join(timeout=10)
        assert not worker.is_alive()
        assert isinstance(outcome[0], HelperDied), outcome
        assert outcome[0].returncode == -signal.SIGKILL

        # The next request starts a new helper.
        with creator.create("tcp", "127.0.0.1", 1023) as fresh:
            assert fresh.getsockname() == ("127.0.0.1", 1023)
        assert creator.pid not in (None, first)
        # The cached socket is still served from the cache and still works.
        again = alloc.get_bound_socket("udp", "127.0.0.1", 1023, share=Share.ANY)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.sendto(b"after the restart", ("127.0.0.1", 1023))
            kept.settimeout(5)
            assert kept.recv(64) == b"after the restart"
        assert os.fstat(again.fileno()).st_ino == os.fstat(kept.fileno()).st_ino
        alloc.close()
