"""Sockets in flight. The kernel counts fds sent but not yet received per *user*
(against the sender's RLIMIT_NOFILE, 8 in the helper), and every helper runs as
the same user: a boss that stops reading must not be able to starve or crash
the helpers of other bosses."""

from __future__ import annotations

import array
import errno
import fcntl
import ipaddress
import os
import socket
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from privsock.helper import protocol
from privsock.helper.protocol import Stage, Status, Transport

from .helper_proc import HelperChannel

pytestmark = pytest.mark.root

LOOPBACK = ipaddress.ip_address("127.0.0.1")


def _queued(sock: socket.socket, request: int) -> int:
    value = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), request, value, True)
    return value[0]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


def helper_read_everything(h: HelperChannel) -> None:
    """Our requests are charged to our socket until the helper has read them."""
    wait_until(lambda: _queued(h.chan, termios.TIOCOUTQ) == 0, "the helper read our requests")


def reply_waiting(h: HelperChannel) -> None:
    wait_until(lambda: _queued(h.chan, termios.FIONREAD) > 0, "a reply is waiting for us")


def create(rid: int, port: int) -> bytes:
    return protocol.encode_request(protocol.Create(rid, Transport.UDP, LOOPBACK, port))


@pytest.fixture
def helpers(root: None, test_policy: Path) -> Iterator[list[HelperChannel]]:
    started: list[HelperChannel] = []

    def more(n: int) -> list[HelperChannel]:
        for _ in range(n):
            h = HelperChannel.for_policy(test_policy)
            h.wait_ready()
            started.append(h)
        return started

    yield more  # type: ignore[misc]
    for h in started:
        h.close()


def test_a_boss_that_does_not_read_gets_one_socket_in_flight(helpers) -> None:  # type: ignore[no-untyped-def]
    (h,) = helpers(1)
    for i in range(12):
        h.send(create(100 + i, 1000 + i))
    helper_read_everything(h)
    replies = [h.recv() for _ in range(12)]
    statuses = [protocol.decode_reply(data).status for data, _, _ in replies]
    fds = [fd for _, got, _ in replies for fd in got]
    assert statuses[0] is Status.OK
    assert len(fds) == 1
    # The rest were refused, without a socket, as long as a reply was unread;
    # now that the boss has read them all, the next one goes through.
    assert set(statuses[1:]) == {Status.RATE_LIMITED}
    os.close(fds[0])
    reply, got = h.exchange(create(200, 1020))
    assert protocol.decode_reply(reply).status is Status.OK
    os.close(got[0])


def test_a_hoarding_boss_neither_starves_nor_crashes_another_bosss_helper(helpers) -> None:  # type: ignore[no-untyped-def]
    hoarder, victim = helpers(2)
    for i in range(12):
        hoarder.send(create(100 + i, 1000 + i))
    helper_read_everything(hoarder)
    reply, got = victim.exchange(create(5, 1021))
    assert protocol.decode_reply(reply).status is Status.OK
    assert len(got) == 1
    os.close(got[0])
    assert hoarder.proc.poll() is None and victim.proc.poll() is None


def test_when_the_users_fds_in_flight_run_out_the_grant_fails_cleanly(helpers) -> None:  # type: ignore[no-untyped-def]
    # Nine helpers with one unread socket each exceed the user's limit of 8 in
    # flight; the tenth cannot pass its socket. It says so, and goes on serving.
    crowd = helpers(10)
    for i, h in enumerate(crowd[:9]):
        h.send(create(i + 1, 1000 + i))
    for h in crowd[:9]:
        reply_waiting(h)
    last = crowd[9]
    reply, got = last.exchange(create(50, 1012))
    decoded = protocol.decode_reply(reply)
    assert got == []
    assert decoded.status is Status.OS_ERROR
    assert decoded.detail == errno.ETOOMANYREFS
    assert decoded.stage is Stage.SEND
    # The audit line of the failed send names the request and the rule, like the
    # grant's own line before it (docs/audit-log.md, reason "send").
    lines = [r for r in last.audit_lines() if r["id"] == 50]
    decisions = [(r["decision"], r["reason"]) for r in lines]
    assert decisions == [("granted", None), ("os_error", "send")]
    failed = lines[1]
    assert (failed["op"], failed["transport"], failed["address"], failed["port"]) == (
        "CREATE", "udp", "127.0.0.1", 1012,
    )  # fmt: skip
    assert (failed["rule"], failed["errno"]) == ("allow[0]", errno.ETOOMANYREFS)
    for h in crowd[:9]:  # the hoarders read: the sockets arrive, the count drops
        data, fds, _ = h.recv()
        assert protocol.decode_reply(data).status is Status.OK
        for fd in fds:
            os.close(fd)
    reply, got = last.exchange(create(51, 1012))
    assert protocol.decode_reply(reply).status is Status.OK
    os.close(got[0])
    assert all(h.proc.poll() is None for h in crowd)
