"""The least a Python helper can do: bench/ref_helper.c's loop in Python.

No policy, no rate limit, no audit log, no hardening, no validation beyond what
it needs to act. Against ref_helper.c it shows what the language costs; against
privsock-helper, what privsock's checks and audit log cost. Standard library only.
"""

from __future__ import annotations

import array
import os
import socket
import struct

_REPLY = struct.Struct(">2sBBIIB3s")
_ANCBUF = socket.CMSG_SPACE(array.array("i").itemsize)


def main() -> None:
    chan = socket.socket(fileno=0)
    while True:
        data = chan.recv(33)
        if not data:
            break
        rid = int.from_bytes(data[4:8], "big")
        if len(data) != 32 or data[3] != 1:  # PING, or anything else: answer OK
            chan.sendmsg([_REPLY.pack(b"PS", 1, 0, rid, 0, 0, b"\0\0\0")])
            continue
        v6 = data[9] == 6
        family = socket.AF_INET6 if v6 else socket.AF_INET
        kind = socket.SOCK_DGRAM if data[8] == 1 else socket.SOCK_STREAM
        host = socket.inet_ntop(family, data[12:28] if v6 else data[12:16])
        port = int.from_bytes(data[10:12], "big")
        sock = socket.socket(family, kind, 0)
        try:
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, data[29] >> 2 & 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            reply = _REPLY.pack(b"PS", 1, 4, rid, exc.errno or 0, 3, b"\0\0\0")
            chan.sendmsg([reply])
            continue
        fds = array.array("i", [sock.fileno()])
        chan.sendmsg([_REPLY.pack(b"PS", 1, 0, rid, 0, 0, b"\0\0\0")],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])  # fmt: skip
        sock.close()
    chan.detach()
    os._exit(0)


if __name__ == "__main__":
    main()
