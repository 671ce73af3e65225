"""privsock.run.bindreq: what the supervisor does with one bind(), as pure logic."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from privsock.helper.protocol import Transport
from privsock.run.bindreq import (
    AllowSpec,
    BindAddress,
    Continue,
    Refuse,
    Serve,
    SockFacts,
    decide,
    needs_privilege,
    parse_allow,
    parse_sockaddr,
)

V4 = ipaddress.IPv4Address("127.0.0.1")
V6 = ipaddress.IPv6Address("::")
TCP4 = SockFacts(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, 0)
UDP6 = SockFacts(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_UDP, 0)


def sin(port: int, addr: str = "127.0.0.1") -> bytes:
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + \
        socket.inet_aton(addr) + bytes(8)  # fmt: skip


def sin6(port: int, addr: str = "::", scope: int = 0) -> bytes:
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, addr) + struct.pack("=I", scope))  # fmt: skip


def test_parse_ipv4_and_ipv6() -> None:
    assert parse_sockaddr(sin(80), 16) == BindAddress(socket.AF_INET, V4, 80)
    assert parse_sockaddr(sin6(53), 28) == BindAddress(socket.AF_INET6, V6, 53)
    assert parse_sockaddr(sin6(53, "fe80::1", 2), 28) == BindAddress(
        socket.AF_INET6, ipaddress.IPv6Address("fe80::1"), 53, 2
    )
    # sockaddr_in6 without the scope id (RFC 2133 length) is accepted by the kernel too.
    assert parse_sockaddr(sin6(53)[:24], 24) == BindAddress(socket.AF_INET6, V6, 53)


@pytest.mark.parametrize(
    ("raw", "length"),
    [
        (sin(80), 15),  # shorter than sockaddr_in: the kernel says EINVAL
        (sin6(80), 23),
        (sin(80), 1),
        (sin(80), 129),  # longer than sockaddr_storage
        (sin(80)[:4], 16),  # could not read all of it (EFAULT territory)
        (struct.pack("=H", socket.AF_UNIX) + b"/tmp/x\0", 9),
        (struct.pack("=H", socket.AF_UNSPEC) + bytes(14), 16),
    ],
)
def test_what_is_not_an_ip_sockaddr_continues(raw: bytes, length: int) -> None:
    assert isinstance(parse_sockaddr(raw, length), Continue)


@given(st.binary(max_size=140), st.integers(-(2**31), 2**31 - 1))
def test_parse_never_raises(raw: bytes, length: int) -> None:
    result = parse_sockaddr(raw, length)
    assert isinstance(result, BindAddress | Continue)


def test_only_ports_below_the_threshold_need_privilege() -> None:
    assert needs_privilege(BindAddress(socket.AF_INET, V4, 80), 1024)
    assert not needs_privilege(BindAddress(socket.AF_INET, V4, 1024), 1024)
    assert not needs_privilege(BindAddress(socket.AF_INET, V4, 0), 1024)  # any port: the kernel
    assert not needs_privilege(BindAddress(socket.AF_INET, V4, 80), 80)


def test_serve_carries_the_protocol_options() -> None:
    facts = SockFacts(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_UDP, 0,
                      reuseaddr=True, reuseport=True, v6only=True)  # fmt: skip
    assert decide(BindAddress(socket.AF_INET6, V6, 53), facts, ()) == Serve(
        Transport.UDP, V6, 53, reuseaddr=True, reuseport=True, v6only=True
    )
    assert decide(BindAddress(socket.AF_INET, V4, 80), TCP4, ()) == Serve(
        Transport.TCP, V4, 80, reuseaddr=False, reuseport=False, v6only=False
    )


def test_mptcp_is_served_as_tcp() -> None:
    facts = SockFacts(socket.AF_INET, socket.SOCK_STREAM, 262, 0)
    verdict = decide(BindAddress(socket.AF_INET, V4, 80), facts, ())
    assert isinstance(verdict, Serve) and verdict.transport is Transport.TCP


@pytest.mark.parametrize(
    ("sock_family", "addr"),
    [
        (socket.AF_INET6, BindAddress(socket.AF_INET, V4, 80)),
        (socket.AF_INET, BindAddress(socket.AF_INET6, V6, 80)),
    ],
)
def test_a_sockaddr_of_another_family_continues(sock_family: int, addr: BindAddress) -> None:
    facts = SockFacts(sock_family, socket.SOCK_STREAM, socket.IPPROTO_TCP, 0)
    assert isinstance(decide(addr, facts, ()), Continue)


def test_an_already_bound_socket_continues() -> None:
    facts = SockFacts(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, 8080)
    assert isinstance(decide(BindAddress(socket.AF_INET, V4, 80), facts, ()), Continue)


@pytest.mark.parametrize(
    ("kind", "proto"),
    [(socket.SOCK_STREAM, 132), (socket.SOCK_DGRAM, 136), (socket.SOCK_RAW, 255),
     (socket.SOCK_SEQPACKET, 132), (socket.SOCK_DGRAM, socket.IPPROTO_ICMP)],
)  # fmt: skip
def test_other_protocols_are_refused(kind: int, proto: int) -> None:
    facts = SockFacts(socket.AF_INET, kind, proto, 0)
    verdict = decide(BindAddress(socket.AF_INET, V4, 80), facts, ())
    assert isinstance(verdict, Refuse) and "not TCP or UDP" in verdict.reason


def test_prebind_options_are_refused() -> None:
    facts = SockFacts(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, 0,
                      prebind=("SO_BINDTODEVICE", "IP_FREEBIND"))  # fmt: skip
    assert decide(BindAddress(socket.AF_INET, V4, 80), facts, ()) == Refuse(
        "SO_BINDTODEVICE, IP_FREEBIND set before bind() cannot be carried"
    )


def test_a_scoped_address_is_refused() -> None:
    verdict = decide(BindAddress(socket.AF_INET6, V6, 53, scope_id=3), UDP6, ())
    assert isinstance(verdict, Refuse) and "scope id 3" in verdict.reason


def test_allow_narrows() -> None:
    allow = (parse_allow("tcp:80"), parse_allow("udp:[::]:53"))
    assert isinstance(decide(BindAddress(socket.AF_INET, V4, 80), TCP4, allow), Serve)
    assert isinstance(decide(BindAddress(socket.AF_INET6, V6, 53), UDP6, allow), Serve)
    refused = decide(BindAddress(socket.AF_INET, V4, 443), TCP4, allow)
    assert refused == Refuse("not in this run's --allow list")
    other = BindAddress(socket.AF_INET6, ipaddress.IPv6Address("::1"), 53)
    assert isinstance(decide(other, UDP6, allow), Refuse)  # the address is part of the spec


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("tcp:80", AllowSpec(Transport.TCP, 80)),
        ("udp:127.0.0.1:53", AllowSpec(Transport.UDP, 53, V4)),
        ("udp:[::]:53", AllowSpec(Transport.UDP, 53, V6)),
    ],
)
def test_parse_allow(spec: str, parsed: AllowSpec) -> None:
    assert parse_allow(spec) == parsed
    assert str(parsed) == spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("80", "expected TRANSPORT:PORT"),
        ("sctp:80", "expected TRANSPORT:PORT"),
        ("tcp:0", "port '0' is not a number in 1-65535"),
        ("tcp:http", "port 'http' is not a number"),
        ("tcp:localhost:80", "'localhost' is not a numeric"),
        ("udp:::1:53", "brackets"),
        ("udp:[::1]53", "expected TRANSPORT:PORT"),
    ],
)
def test_parse_allow_refuses(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_allow(spec)
