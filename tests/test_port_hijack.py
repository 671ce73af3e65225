"""UDP port hijack: on Linux SO_REUSEADDR on UDP has no owner check, so a second
socket with it may bind a port that another user's service holds with it
(dnsmasq, systemd-resolved's stub listener), and the newest socket gets the
unicast traffic. A boss must never get such a socket from the helper.

These bind 127.0.0.1:53 and so belong in a private network namespace
(``unshare -n``), as the whole suite does."""

from __future__ import annotations

import errno
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from privsock.client import SocketCreator
from privsock.errors import CreatorOSError, HelperStartError, PolicyDenied
from privsock.helper.exitcodes import Exit
from privsock.helper.protocol import Reason, Stage
from tests.auditlines import Records

from .conftest import DEFAULT_POLICY

pytestmark = pytest.mark.root

LOOPBACK = "127.0.0.1"


def _udp_reuseaddr(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.settimeout(5)
    return sock


def _send(address: str, port: int, payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(payload, (address, port))


@pytest.fixture
def victim(root: None) -> Iterator[socket.socket]:
    """A root service on UDP 127.0.0.1:53 with SO_REUSEADDR, as a resolver binds it."""
    with _udp_reuseaddr(LOOPBACK, 53) as sock:
        yield sock


# The thief's half, run as nobody: bind the port with SO_REUSEADDR and read one datagram.
_THIEF = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.settimeout(10)
print("bound", flush=True)
print(s.recv(64).decode(), flush=True)
"""


def test_the_kernel_really_lets_another_user_take_a_udp_reuseaddr_port(root: None) -> None:
    """The threat is real on this kernel (so the tests below are not vacuous): a
    socket of another user, with SO_REUSEADDR, takes over the port from root's."""
    port = 1053  # unprivileged, so that nobody can bind it without any capability
    with _udp_reuseaddr(LOOPBACK, port) as owner:
        thief = subprocess.Popen(
            ["/usr/bin/python3", "-I", "-c", _THIEF, str(port)],
            user="nobody", group="nogroup", extra_groups=[],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert thief.stdout is not None
            assert thief.stdout.readline() == "bound\n", thief.stderr
            _send(LOOPBACK, port, b"query")
            out, err = thief.communicate(timeout=10)
        finally:
            thief.kill()
            thief.wait()
        assert out == "query\n", err
        owner.settimeout(0.2)
        with pytest.raises(TimeoutError):
            owner.recv(64)  # the owner lost it


def test_the_default_policy_never_hands_out_a_hijacking_socket(victim: socket.socket) -> None:
    records = Records()
    with SocketCreator(str(DEFAULT_POLICY), audit_sink=records) as creator:
        with pytest.raises(PolicyDenied) as denied:
            creator.create("udp", LOOPBACK, 53, reuseaddr=True)
        assert denied.value.reason is Reason.OPTION
        # Without the option the kernel keeps the port for its owner.
        for address in (LOOPBACK, "0.0.0.0"):
            with pytest.raises(CreatorOSError) as busy:
                creator.create("udp", address, 53)
            assert (busy.value.errno, busy.value.stage) == (errno.EADDRINUSE, Stage.BIND)
    _send(LOOPBACK, 53, b"still mine")
    assert victim.recv(64) == b"still mine"
    helper = [r for r in records if r["side"] == "helper" and r["op"] == "CREATE"]
    assert helper[0]["decision"] == "denied" and helper[0]["reason"] == "option"


def test_a_policy_granting_udp_reuseaddr_is_refused_at_start(
    root: None, policy_factory: Callable[[str], Path]
) -> None:
    policy = policy_factory(
        """
        version = 1
        [[allow]]
        transports = ["udp"]
        ports = [53]
        addresses = ["127.0.0.0/8"]
        options = ["reuseaddr"]
        """
    )
    with pytest.raises(HelperStartError) as refused:
        SocketCreator(str(policy), audit_sink=None).start()
    assert refused.value.returncode == Exit.DATAERR
    assert "allow[0].options[0]: reuseaddr is never granted for udp" in str(refused.value)
    assert "port hijack" in str(refused.value)


def test_tcp_reuseaddr_cannot_join_a_listening_port(root: None) -> None:
    """Why TCP keeps reuseaddr: a listener's port is not for sharing, reuseaddr or not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, 53))
        listener.listen(1)
        with SocketCreator(str(DEFAULT_POLICY), audit_sink=None) as creator:
            for address in (LOOPBACK, "0.0.0.0"):
                with pytest.raises(CreatorOSError) as busy:
                    creator.create("tcp", address, 53, reuseaddr=True)
                assert busy.value.errno == errno.EADDRINUSE


def test_reuseport_joins_exactly_the_groups_of_the_helper_user(
    root: None, test_policy: Path
) -> None:
    """What granting reuseport allows, as documented: every socket a helper creates
    belongs to the helper's user, so a second boss (its own helper, same user) can
    join the first boss's SO_REUSEPORT group; a group of another user cannot be
    joined, and neither can a socket without SO_REUSEPORT."""
    with (
        SocketCreator(str(test_policy), audit_sink=None) as first,
        SocketCreator(str(test_policy), audit_sink=None) as second,
    ):
        with (
            first.create("udp", LOOPBACK, 1020, reuseport=True) as mine,
            second.create("udp", LOOPBACK, 1020, reuseport=True) as joined,
        ):
            assert joined.getsockname() == mine.getsockname()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as roots:
            roots.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            roots.bind((LOOPBACK, 1021))  # a reuseport group of root's
            with pytest.raises(CreatorOSError) as busy:
                second.create("udp", LOOPBACK, 1021, reuseport=True)
            assert busy.value.errno == errno.EADDRINUSE
        with first.create("udp", LOOPBACK, 1022) as plain:  # no SO_REUSEPORT
            with pytest.raises(CreatorOSError) as busy:
                second.create("udp", LOOPBACK, 1022, reuseport=True)
            assert busy.value.errno == errno.EADDRINUSE
            assert plain.getsockname()[1] == 1022
