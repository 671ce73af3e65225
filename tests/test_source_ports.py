"""A residual risk SECURITY.md states, shown on the real kernel: a socket granted
on a privileged port is also a privileged *source* port. The policy cannot stop
this; these tests keep the documentation honest."""

from __future__ import annotations

import ctypes
import socket
from pathlib import Path

import pytest

from privsock.client import SocketCreator

pytestmark = pytest.mark.root

_LIBC = ctypes.CDLL(None, use_errno=True)


def _disconnect(sock: socket.socket) -> None:
    """connect(AF_UNSPEC): the kernel turns a listening TCP socket back into a
    closed one that keeps its bound port."""
    unspec = (ctypes.c_ushort * 8)(socket.AF_UNSPEC)
    assert _LIBC.connect(sock.fileno(), ctypes.byref(unspec), ctypes.sizeof(unspec)) == 0


def test_a_granted_tcp_listener_can_connect_out_from_its_privileged_port(
    creator: SocketCreator,
) -> None:
    with socket.socket() as peer:
        peer.bind(("127.0.0.1", 0))
        peer.listen(1)
        with creator.create("tcp", "127.0.0.1", 80, reuseaddr=True) as granted:
            granted.listen(1)  # as privsock exec hands it over
            _disconnect(granted)
            granted.connect(peer.getsockname())
            conn, source = peer.accept()
            conn.close()
    assert source == ("127.0.0.1", 80)


def test_a_granted_udp_socket_sends_from_its_privileged_port(creator: SocketCreator) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(10)
        with creator.create("udp", "127.0.0.1", 53) as granted:
            granted.sendto(b"from 53", peer.getsockname())
        assert peer.recvfrom(64) == (b"from 53", ("127.0.0.1", 53))


def test_security_md_states_the_risk() -> None:
    text = (Path(__file__).resolve().parent.parent / "SECURITY.md").read_text()
    assert "privileged source port" in text and "connect(AF_UNSPEC)" in text
