"""Reading the program's socket, and making the helper's socket behave like it.

The helper binds a fresh socket; the program had set flags and options on its
own before bind(). Three kinds are handled differently:

* what protocol v1 carries (SO_REUSEADDR, SO_REUSEPORT, IPV6_V6ONLY) goes to
  the helper with the request, so the policy judges it;
* options that act *at* bind() time and that the helper cannot set
  (SO_BINDTODEVICE, IP_FREEBIND, IP_TRANSPARENT, IP_BIND_ADDRESS_NO_PORT and
  their IPv6 twins) make the bind refused: served without them, the socket
  would be bound differently from what the program asked for;
* the fd's status flag O_NONBLOCK (Go, nginx and every event loop depend on
  it), close-on-exec, and a fixed list of common options that matter only
  after bind() are copied onto the new socket when they differ from a fresh
  socket's. Options outside that list are not carried (docs: known limits).
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Callable

from privsock.run.bindreq import SockFacts

# include/uapi/asm-generic/socket.h, linux/in.h, linux/in6.h, linux/tcp.h
SO_BINDTOIFINDEX = 62
IP_FREEBIND = 15
IP_TRANSPARENT = 19
IP_BIND_ADDRESS_NO_PORT = 24
IPV6_TRANSPARENT = 75
IPV6_FREEBIND = 78

_PREBIND = {
    socket.AF_INET: (
        (socket.SOL_SOCKET, SO_BINDTOIFINDEX, "SO_BINDTODEVICE"),
        (socket.IPPROTO_IP, IP_FREEBIND, "IP_FREEBIND"),
        (socket.IPPROTO_IP, IP_TRANSPARENT, "IP_TRANSPARENT"),
        (socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, "IP_BIND_ADDRESS_NO_PORT"),
    ),
    socket.AF_INET6: (
        (socket.SOL_SOCKET, SO_BINDTOIFINDEX, "SO_BINDTODEVICE"),
        (socket.IPPROTO_IPV6, IPV6_FREEBIND, "IPV6_FREEBIND"),
        (socket.IPPROTO_IPV6, IPV6_TRANSPARENT, "IPV6_TRANSPARENT"),
        (socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, "IP_BIND_ADDRESS_NO_PORT"),
    ),
}

# Integer options carried as they are, per (level) and family.
_SOCKET_INTS = (
    socket.SO_KEEPALIVE, socket.SO_BROADCAST, socket.SO_OOBINLINE, socket.SO_PRIORITY,
    socket.SO_RCVLOWAT, 29, 35,  # SO_TIMESTAMP, SO_TIMESTAMPNS
)  # fmt: skip
_BUFFERS = (socket.SO_RCVBUF, socket.SO_SNDBUF)  # the kernel reports twice what was set
_STRUCTS = ((socket.SO_LINGER, 8), (socket.SO_RCVTIMEO, 16), (socket.SO_SNDTIMEO, 16))
_IP_INTS = (
    socket.IP_TOS, socket.IP_TTL, 8, 13, 12, 11, 10, 20,
    # IP_PKTINFO, IP_RECVTOS, IP_RECVTTL, IP_RECVERR, IP_MTU_DISCOVER, IP_RECVORIGDSTADDR
)  # fmt: skip
_IPV6_INTS = (16, 25, 23, 49, 51, 66, 67)
# IPV6_UNICAST_HOPS, IPV6_RECVERR, IPV6_MTU_DISCOVER, IPV6_RECVPKTINFO,
# IPV6_RECVHOPLIMIT, IPV6_RECVTCLASS, IPV6_TCLASS
_TCP_INTS = (
    socket.TCP_NODELAY, socket.TCP_DEFER_ACCEPT, 23, socket.TCP_KEEPIDLE,
    socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT, 18,  # TCP_FASTOPEN, TCP_USER_TIMEOUT
)  # fmt: skip

Getter = Callable[[socket.socket], int | bytes]
Setter = Callable[[socket.socket, int | bytes], None]


def _carried(family: int, kind: int) -> list[tuple[str, Getter, Setter]]:
    table: list[tuple[str, Getter, Setter]] = []

    def intopt(level: int, opt: int, scale: int = 1) -> None:
        table.append((
            f"{level}/{opt}",
            lambda s: s.getsockopt(level, opt),
            lambda s, v: s.setsockopt(level, opt, int(v) // scale),
        ))  # fmt: skip

    for opt in _SOCKET_INTS:
        intopt(socket.SOL_SOCKET, opt)
    for opt in _BUFFERS:
        intopt(socket.SOL_SOCKET, opt, 2)
    def structopt(opt: int, size: int) -> None:
        def put(s: socket.socket, v: int | bytes) -> None:
            s.setsockopt(socket.SOL_SOCKET, opt, v if isinstance(v, bytes) else int(v))

        table.append((f"1/{opt}", lambda s: s.getsockopt(socket.SOL_SOCKET, opt, size), put))

    for opt, size in _STRUCTS:
        structopt(opt, size)
    for opt in _IP_INTS if family == socket.AF_INET else _IPV6_INTS:
        intopt(socket.IPPROTO_IP if family == socket.AF_INET else socket.IPPROTO_IPV6, opt)
    if kind == socket.SOCK_STREAM:
        for opt in _TCP_INTS:
            intopt(socket.IPPROTO_TCP, opt)
    return table


_DEFAULTS: dict[tuple[int, int], list[tuple[Getter, Setter, int | bytes | None]]] = {}


def _defaults(family: int, kind: int) -> list[tuple[Getter, Setter, int | bytes | None]]:
    """Each carried option with its value on a fresh socket, measured once."""
    key = (family, kind)
    if key not in _DEFAULTS:
        rows: list[tuple[Getter, Setter, int | bytes | None]] = []
        with socket.socket(family, kind) as fresh:
            for _name, get, put in _carried(family, kind):
                try:
                    rows.append((get, put, get(fresh)))
                except OSError:
                    continue  # not on this kernel: nothing to carry
        _DEFAULTS[key] = rows
    return _DEFAULTS[key]


def _flag(sock: socket.socket, level: int, opt: int) -> bool:
    try:
        return sock.getsockopt(level, opt) != 0
    except OSError:
        return False


def facts(sock: socket.socket) -> SockFacts:
    """What the program's socket is, and which options it set that matter."""
    family, kind, proto = sock.family, sock.type, sock.proto
    bound_port = 0
    if family in (socket.AF_INET, socket.AF_INET6):
        bound_port = sock.getsockname()[1]
    prebind = tuple(
        name for level, opt, name in _PREBIND.get(family, ()) if _flag(sock, level, opt)
    )
    return SockFacts(
        family=family, type=kind, protocol=proto, bound_port=bound_port,
        reuseaddr=_flag(sock, socket.SOL_SOCKET, socket.SO_REUSEADDR),
        reuseport=_flag(sock, socket.SOL_SOCKET, socket.SO_REUSEPORT),
        v6only=family == socket.AF_INET6
        and _flag(sock, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY),
        prebind=prebind,
    )  # fmt: skip


def copy(src: socket.socket, dst: socket.socket) -> None:
    """Carry O_NONBLOCK and the listed options from the program's socket to the
    helper's. Both are open file descriptions of their own: the new socket's
    O_NONBLOCK must be set on it, it is not shared with the old one."""
    if fcntl.fcntl(src.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK:
        flags = fcntl.fcntl(dst.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(dst.fileno(), fcntl.F_SETFL, flags | os.O_NONBLOCK)
    for get, put, default in _defaults(src.family, src.type):
        value = get(src)
        if value != default:
            put(dst, value)


def fd_cloexec(tgid: int, fd: int) -> bool:
    """Is the program's fd close-on-exec? That is a property of its fd table
    entry, not of the socket, so it is read from /proc/PID/fdinfo."""
    with open(f"/proc/{tgid}/fdinfo/{fd}", encoding="ascii") as f:
        for line in f:
            if line.startswith("flags:"):
                return bool(int(line.split()[1], 8) & os.O_CLOEXEC)
    raise OSError(f"/proc/{tgid}/fdinfo/{fd} has no flags line")
