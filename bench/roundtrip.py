"""Per-socket measurements: one CREATE to the fd received and closed, through the
C driver, the real client or a minimal Python client, in-process binds, and
pipelined requests. Each returns nanoseconds."""

from __future__ import annotations

import array
import ctypes
import ipaddress
import os
import socket
import time
from typing import Any

from bench.plan import ADDRESS, PORT, TRANSPORT, BenchError
from privsock.client import SocketCreator
from privsock.helper import protocol

ANCBUF = socket.CMSG_SPACE(4 * array.array("i").itemsize)


def _ns_array(n: int) -> Any:
    return (ctypes.c_int64 * n)()


def c_failure(lib: ctypes.CDLL, rc: int) -> str:
    """What a negative return of the C driver means."""
    if rc <= -30000:
        return "short reply"
    if rc <= -20000:
        return "an OK reply without exactly one fd"
    if rc <= -10000:
        raw = bytes((ctypes.c_ubyte * protocol.REPLY_SIZE).in_dll(lib, "last_reply"))
        return f"reply {protocol.decode_reply(raw)}"
    return os.strerror(-rc)


def c_round_trips(lib: ctypes.CDLL, chan: socket.socket, transport: str, family: int,
                  port: int, n: int) -> list[int]:  # fmt: skip
    out = _ns_array(n)
    rc = lib.round_trips(chan.fileno(), n, TRANSPORT[transport], family, port, out)
    if rc:
        raise BenchError(f"C driver {transport}/IPv{family}: {c_failure(lib, rc)}")
    return list(out)


def client_round_trips(creator: SocketCreator, transport: str, family: int, port: int,
                       n: int) -> list[int]:  # fmt: skip
    address, clock, samples = ADDRESS[family], time.perf_counter_ns, []
    for _ in range(n):
        t0 = clock()
        creator.create(transport, address, port).close()
        samples.append(clock() - t0)
    return samples


def _receive_one(chan: socket.socket) -> tuple[bytes, list[int]]:
    data, anc, _flags, _ = chan.recvmsg(protocol.REPLY_SIZE + 1, ANCBUF, socket.MSG_CMSG_CLOEXEC)
    return data, protocol.received_fds(anc)


def raw_round_trips(chan: socket.socket, transport: str, family: int, port: int,
                    n: int) -> list[int]:  # fmt: skip
    """The least a Python boss can do per socket: send fixed bytes, take the fd, close it."""
    address = ipaddress.ip_address(ADDRESS[family])
    req = protocol.Create(1, protocol.Transport[transport.upper()], address, port)
    request = protocol.encode_request(req)
    clock, samples = time.perf_counter_ns, []
    for _ in range(n):
        t0 = clock()
        chan.sendmsg([request])
        data, fds = _receive_one(chan)
        for fd in fds:
            os.close(fd)
        samples.append(clock() - t0)
        if len(fds) != 1:
            raise BenchError(f"raw Python client {transport}/IPv{family}: reply {data!r}")
    return samples


def py_in_process(transport: str, family: int, n: int) -> list[int]:
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    address, clock, samples = ADDRESS[family], time.perf_counter_ns, []
    for _ in range(n):
        t0 = clock()
        with socket.socket(af, kind) as sock:
            if family == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((address, PORT["in_process"]))
        samples.append(clock() - t0)
    return samples


def c_in_process(lib: ctypes.CDLL, transport: str, family: int, n: int) -> list[int]:
    out = _ns_array(n)
    rc = lib.in_process(n, TRANSPORT[transport], family, PORT["in_process"], out)
    if rc:
        raise BenchError(f"C in-process {transport}/IPv{family}: {c_failure(lib, rc)}")
    return list(out)


def c_pipelined(lib: ctypes.CDLL, chan: socket.socket, base: int, depth: int, n: int) -> int:
    total = ctypes.c_int64()
    rc = lib.pipelined(chan.fileno(), n, depth, TRANSPORT["udp"], 4, base, ctypes.byref(total))
    if rc:
        raise BenchError(f"C pipelined, depth {depth}: {c_failure(lib, rc)}")
    return total.value


def py_pipelined(chan: socket.socket, base: int, depth: int, n: int) -> int:
    """c_pipelined in Python with privsock.helper.protocol, over the raw channel."""
    address = ipaddress.IPv4Address(ADDRESS[4])
    sent = done = 0
    t0 = time.perf_counter_ns()
    while done < n:
        while sent < n and sent - done < depth:
            req = protocol.Create(sent + 1, protocol.Transport.UDP, address, base + sent % depth)
            chan.sendmsg([protocol.encode_request(req)])
            sent += 1
        data, fds = _receive_one(chan)
        for fd in fds:
            os.close(fd)
        reply = protocol.decode_reply(data)
        if reply.status is not protocol.Status.OK or len(fds) != 1:
            raise BenchError(f"Python pipelined, depth {depth}: {reply}, {len(fds)} fds")
        done += 1
    return time.perf_counter_ns() - t0

