"""The boss trusts nothing the helper sends: every rule of the reply is checked,
and a helper that breaks one is killed. Uses a deliberately bad helper."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from privsock.client import SocketCreator
from privsock.errors import ProtocolViolation

BAD_HELPER = Path(__file__).parent / "fakes" / "bad_helper.py"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("wrong_id", "answered request"),
        ("two_fds", "sent 2 fds with a OK reply"),
        ("fd_on_denied", "sent 1 fds with a DENIED reply"),
        ("no_fd_on_ok", "sent 0 fds with a OK reply"),
        ("long_reply", r"reply is 17 bytes, not 16"),
        ("huge_reply", "over-long reply"),
        ("short_reply", "invalid reply"),
        ("bad_status", "invalid reply"),
        ("wrong_socket_type", "sent a AF_INET/SOCK_STREAM socket for udp:127.0.0.1:53"),
        ("wrong_address", r"sent a socket bound to 127\.0\.0\.2 port \d+ for udp:127.0.0.1:53"),
        ("unbound", "sent a socket bound to no address for udp:127.0.0.1:53"),
        ("silent", "no reply within 0.5s"),
    ],
)
def test_a_helper_that_breaks_the_protocol_is_killed(
    test_policy: Path, mode: str, message: str
) -> None:
    creator = SocketCreator(
        str(test_policy), helper_argv=[sys.executable, str(BAD_HELPER), mode],
        audit_sink=None, reply_timeout=0.5,
    )  # fmt: skip
    creator.start()
    pid = creator.pid
    assert pid is not None
    before = open_fds()
    try:
        with pytest.raises(ProtocolViolation, match=message) as info:
            creator.create("udp", "127.0.0.1", 53)
        assert str(info.value).endswith("; it was killed")  # our child: it was
        assert not os.path.exists(f"/proc/{pid}")  # killed and reaped
        # Whatever fds the bad reply carried were closed, and the channel too.
        assert open_fds() <= before - 1
    finally:
        creator.close()
