"""A helper that answers the handshake, then breaks the protocol in one way.

    python bad_helper.py MODE --policy FILE

It stands in for a buggy or hostile helper, to show what the boss accepts.
"""

from __future__ import annotations

import array
import socket
import sys
import time

from privsock.helper import protocol

MODE = sys.argv[1]
chan = socket.socket(fileno=0)


def send(reply: bytes, fds: list[int] | None = None) -> None:
    anc = []
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    chan.sendmsg([reply], anc)


def reply(status: protocol.Status, rid: int, code: int = 0) -> bytes:
    return protocol.encode_reply(protocol.Reply(status, rid, 0, code))


def udp() -> int:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM).detach()


while True:
    data = chan.recv(64)
    if not data:
        break
    req = protocol.decode_request(data)
    rid = req.request_id
    if isinstance(req, protocol.Ping):
        send(reply(protocol.Status.OK, rid))
        continue
    if MODE == "wrong_id":
        send(reply(protocol.Status.OK, rid + 1), [udp()])
    elif MODE == "two_fds":
        send(reply(protocol.Status.OK, rid), [udp(), udp()])
    elif MODE == "fd_on_denied":
        send(reply(protocol.Status.DENIED, rid, protocol.Reason.PORT), [udp()])
    elif MODE == "no_fd_on_ok":
        send(reply(protocol.Status.OK, rid))
    elif MODE == "long_reply":
        send(reply(protocol.Status.OK, rid) + b"\0", [udp()])
    elif MODE == "huge_reply":
        send(reply(protocol.Status.OK, rid) * 8, [udp()])
    elif MODE == "short_reply":
        send(reply(protocol.Status.OK, rid)[:15], [udp()])
    elif MODE == "bad_status":
        send(protocol.encode_reply(protocol.Reply(protocol.Status.OK, rid))[:3] + b"\x09"
             + reply(protocol.Status.OK, rid)[4:])  # fmt: skip
    elif MODE == "wrong_socket_type":
        send(reply(protocol.Status.OK, rid),
             [socket.socket(socket.AF_INET, socket.SOCK_STREAM).detach()])  # fmt: skip
    elif MODE == "wrong_address":  # the socket asked for, bound, but not where asked
        assert isinstance(req, protocol.Create)
        tcp = req.transport is protocol.Transport.TCP
        wrong = socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
        wrong.bind(("127.0.0.2", 0))
        send(reply(protocol.Status.OK, rid), [wrong.detach()])
    elif MODE == "unbound":
        send(reply(protocol.Status.OK, rid), [udp()])
    elif MODE == "silent":
        time.sleep(3600)
    else:
        raise SystemExit(f"unknown mode {MODE}")
