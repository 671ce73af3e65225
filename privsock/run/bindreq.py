"""What `privsock run` does with one intercepted bind(): pure, no I/O.

The supervisor reads the caller's sockaddr and looks at the caller's socket;
this module turns those facts into one of three answers:

* Continue: let the kernel run the bind itself, with the program's own (lack
  of) privilege. Everything privsock does not serve goes this way: non-IP
  families, unprivileged ports, port 0, a socket already bound, a sockaddr
  whose family is not the socket's. The kernel then gives the program exactly
  the answer it would give without privsock.
* Refuse(reason): the program gets EACCES, as an unprivileged bind would, and
  the reason goes to the log.
* Serve(...): ask the helper for a socket bound to this address, with these
  options.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from privsock.helper.protocol import IPAddress, Transport

IPPROTO_MPTCP = 262  # include/uapi/linux/in.h
SOCKADDR_MAX = 128  # sizeof(struct sockaddr_storage): the kernel refuses longer
_SIN_SIZE = 16  # sizeof(struct sockaddr_in)
_SIN6_SIZE = 24  # SIN6_LEN_RFC2133: the kernel accepts a sockaddr_in6 without scope id


@dataclass(frozen=True, slots=True)
class BindAddress:
    """An IP address a program asked to bind, as read from its memory."""

    family: int  # AF_INET or AF_INET6: what the sockaddr says
    address: IPAddress
    port: int
    scope_id: int = 0


@dataclass(frozen=True, slots=True)
class SockFacts:
    """The program's socket, as the supervisor found it."""

    family: int
    type: int
    protocol: int
    bound_port: int  # 0 if not bound yet
    reuseaddr: bool = False
    reuseport: bool = False
    v6only: bool = False
    prebind: tuple[str, ...] = ()  # options set that must act before bind()


@dataclass(frozen=True, slots=True)
class AllowSpec:
    """`--allow tcp:80` or `--allow udp:[::]:53`: narrows what one run may ask."""

    transport: Transport
    port: int
    address: IPAddress | None = None

    def __str__(self) -> str:
        where = "" if self.address is None else (
            f"[{self.address}]:" if self.address.version == 6 else f"{self.address}:"
        )  # fmt: skip
        return f"{self.transport.name.lower()}:{where}{self.port}"

    def matches(self, transport: Transport, address: IPAddress, port: int) -> bool:
        return (
            self.transport is transport
            and self.port == port
            and (self.address is None or self.address == address)
        )


@dataclass(frozen=True, slots=True)
class Continue:
    why: str


@dataclass(frozen=True, slots=True)
class Refuse:
    reason: str


@dataclass(frozen=True, slots=True)
class Serve:
    transport: Transport
    address: IPAddress
    port: int
    reuseaddr: bool
    reuseport: bool
    v6only: bool


Verdict = Continue | Refuse | Serve


def parse_sockaddr(raw: bytes, addrlen: int) -> BindAddress | Continue:
    """The sockaddr a program passed to bind(). `raw` holds what could be read
    of its first min(addrlen, 128) bytes. Anything the kernel itself would
    refuse, or that is not IPv4/IPv6, continues to the kernel."""
    if not 2 <= addrlen <= SOCKADDR_MAX or len(raw) < min(addrlen, SOCKADDR_MAX):
        return Continue("sockaddr length the kernel refuses")
    (family,) = struct.unpack_from("=H", raw)
    if family == socket.AF_INET:
        if addrlen < _SIN_SIZE:
            return Continue("short sockaddr_in")
        (port,) = struct.unpack_from("!H", raw, 2)
        return BindAddress(family, ipaddress.IPv4Address(raw[4:8]), port)
    if family == socket.AF_INET6:
        if addrlen < _SIN6_SIZE:
            return Continue("short sockaddr_in6")
        (port,) = struct.unpack_from("!H", raw, 2)
        scope = struct.unpack_from("=I", raw, 24)[0] if addrlen >= _SIN6_SIZE + 4 else 0
        return BindAddress(family, ipaddress.IPv6Address(raw[8:24]), port, scope)
    return Continue("not an IP address family")


def needs_privilege(addr: BindAddress, unprivileged_port_start: int) -> bool:
    """Only a bind the program cannot make itself is worth serving."""
    return 0 < addr.port < unprivileged_port_start


def transport_of(facts: SockFacts) -> Transport | None:
    """TCP or UDP as the helper can make them. MPTCP is served as plain TCP
    (its listeners fall back to TCP anyway); anything else is not served."""
    if facts.type == socket.SOCK_STREAM and facts.protocol in (socket.IPPROTO_TCP, IPPROTO_MPTCP):
        return Transport.TCP
    if facts.type == socket.SOCK_DGRAM and facts.protocol == socket.IPPROTO_UDP:
        return Transport.UDP
    return None


def decide(addr: BindAddress, facts: SockFacts, allow: tuple[AllowSpec, ...]) -> Verdict:
    """The answer to a privileged-port bind() on a socket with these facts."""
    # The kernel refuses a sockaddr of another family than the socket's
    # (EAFNOSUPPORT, EINVAL); let it. Serving would hand the program a socket
    # of the sockaddr's family in place of the one it made.
    if facts.family != addr.family:
        return Continue("sockaddr family differs from the socket's")
    if facts.bound_port:
        return Continue("socket already bound")  # the kernel says EINVAL
    transport = transport_of(facts)
    if transport is None:
        return Refuse(f"socket type {facts.type} protocol {facts.protocol} is not TCP or UDP")
    if facts.prebind:
        return Refuse(f"{', '.join(facts.prebind)} set before bind() cannot be carried")
    if addr.scope_id:
        return Refuse(f"scoped IPv6 address (scope id {addr.scope_id}) cannot be carried")
    if allow and not any(spec.matches(transport, addr.address, addr.port) for spec in allow):
        return Refuse("not in this run's --allow list")
    return Serve(
        transport, addr.address, addr.port, facts.reuseaddr, facts.reuseport,
        facts.v6only and facts.family == socket.AF_INET6,
    )  # fmt: skip


def parse_allow(spec: str) -> AllowSpec:
    """`tcp:80`, `udp:53`, `tcp:127.0.0.1:80`, `udp:[::]:53`; ValueError with
    the reason otherwise."""
    form = "expected TRANSPORT:PORT or TRANSPORT:ADDRESS:PORT, as in tcp:80 or udp:[::1]:53"
    transport, sep, rest = spec.partition(":")
    if not sep or transport not in ("tcp", "udp"):
        raise ValueError(f"{spec!r}: {form}")
    host: str | None
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
        if not sep:
            raise ValueError(f"{spec!r}: {form}")
    elif ":" in rest:
        host, _, port = rest.rpartition(":")
        if ":" in host:
            raise ValueError(f"{spec!r}: put an IPv6 address in brackets")
    else:
        host, port = None, rest
    address: IPAddress | None = None
    if host is not None:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{spec!r}: {host!r} is not a numeric IPv4 or IPv6 address") from None
        if "%" in host:  # a scoped bind is refused by decide(), so it could match nothing
            raise ValueError(f"{spec!r}: scoped addresses (%zone) are not supported")
    if not (port.isascii() and port.isdigit() and len(port) <= 5) or not 1 <= int(port) <= 65535:
        raise ValueError(f"{spec!r}: port {port!r} is not a number in 1-65535")
    return AllowSpec(Transport[transport.upper()], int(port), address)
