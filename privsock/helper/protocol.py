"""The privsock wire protocol, version 1: types and pure functions, no I/O.

Both sides import this module; it is the whole contract (privsock/helper/PROTOCOL.md
explains it for humans). The rules:

* The transport is one AF_UNIX SOCK_SEQPACKET socketpair. One message is one
  request or one reply, so a bad message can never leave the sides out of step.
* A request is exactly 32 bytes, a reply exactly 16. All integers are big-endian.
* Every field has a closed set of legal values. Anything else (length, magic,
  version, op, transport, family, port 0, an unknown option bit, V6ONLY on IPv4,
  non-zero padding or reserved bytes) is MALFORMED. Nothing is guessed.
* Ancillary data is never valid in a request. File descriptors travel only in an
  OK reply to CREATE, exactly one; that rule lives with the I/O (``serve``,
  ``client``), which checks it using ``reply_carries_fd``.

Request (32 bytes)::

    0  2  magic b"PS"          12 16 address (IPv4: bytes 12-15, 16-27 zero)
    2  1  version = 1          28  2 options (bit 0 REUSEADDR, 1 REUSEPORT,
    3  1  op (1 CREATE, 2 PING)       2 V6ONLY); other bits zero
    4  4  request id           30  2 reserved, zero
    8  1  transport (1 UDP, 2 TCP)
    9  1  family (4, 6)
    10 2  port, 1-65535        A PING has bytes 8-31 all zero.

Reply (16 bytes)::

    0  2  magic b"PS"          8  4  detail: errno (OS_ERROR) or retry-after
    2  1  version = 1                ms (RATE_LIMITED), otherwise 0
    3  1  status               12 1  stage (OS_ERROR) or reason (DENIED)
    4  4  request id           13 3  reserved, zero
"""

from __future__ import annotations

import array
import enum
import ipaddress
import socket
import struct
from typing import NamedTuple

MAGIC = b"PS"
VERSION = 1
REQUEST_SIZE = 32
REPLY_SIZE = 16

_REQUEST = struct.Struct(">2sBBIBBH16sHH")
_REQUEST_INTS = struct.Struct(">2sBBIBBHQQHH")  # the same, the address as two integers
_REPLY = struct.Struct(">2sBBIIB3s")
assert _REQUEST.size == _REQUEST_INTS.size == REQUEST_SIZE
assert _REPLY.size == REPLY_SIZE

_ZERO16 = bytes(16)
_ZERO12 = bytes(12)


class Op(enum.IntEnum):
    CREATE = 1
    PING = 2


class Transport(enum.IntEnum):
    UDP = 1
    TCP = 2


class Family(enum.IntEnum):
    IPV4 = 4
    IPV6 = 6


class Option(enum.IntFlag):
    REUSEADDR = 1
    REUSEPORT = 2
    V6ONLY = 4


ALL_OPTIONS = Option.REUSEADDR | Option.REUSEPORT | Option.V6ONLY
# The names policies, audit lines and the CLI use; one table for all of them.
TRANSPORT_NAMES = {"udp": Transport.UDP, "tcp": Transport.TCP}
OPTION_NAMES = {
    "reuseaddr": Option.REUSEADDR,
    "reuseport": Option.REUSEPORT,
    "v6only": Option.V6ONLY,
}
NO_OPTIONS = Option(0)
_TRANSPORTS = {int(t): t for t in Transport}
# Plain ints for the decoder: comparing with an IntEnum member is slower.
_PING, _CREATE, _IPV4, _IPV6 = int(Op.PING), int(Op.CREATE), int(Family.IPV4), int(Family.IPV6)
_ALL_OPTIONS = int(ALL_OPTIONS)
_V6ONLY = int(Option.V6ONLY)
# Every valid options value, built once: calling Option() per request is slow.
_OPTIONS = tuple(Option(value) for value in range(_ALL_OPTIONS + 1))


class Status(enum.IntEnum):
    OK = 0
    DENIED = 1
    RATE_LIMITED = 2
    MALFORMED = 3
    OS_ERROR = 4


class Stage(enum.IntEnum):
    """Where an OS_ERROR happened in the helper."""

    SOCKET = 1
    SETSOCKOPT = 2
    BIND = 3
    SEND = 4  # passing the bound socket back failed (the fd was closed)


class Reason(enum.IntEnum):
    """Why a CREATE was DENIED: the policy dimension that refused it."""

    PORT = 1
    ADDRESS = 2
    TRANSPORT = 3
    OPTION = 4


class ProtocolError(ValueError):
    """A message that is not valid protocol v1. ``request_id`` is what a reply
    should echo: the id if the first 8 bytes were present, otherwise 0."""

    def __init__(self, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.request_id = request_id


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_ADDRESS_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)


# The helper's record types are NamedTuples, not dataclasses: importing dataclasses
# loads inspect, ast and dis, about 1 MiB of a serving helper. A NamedTuple is a
# tuple and equals any tuple of the same values, so code that can hold more than
# one kind of record tells them apart with isinstance, never with ==.
class Create(NamedTuple):
    """CREATE: a socket of ``transport`` bound to (address, port), with ``options``."""

    request_id: int
    transport: Transport
    address: IPAddress
    port: int
    options: Option = NO_OPTIONS

    @property
    def family(self) -> Family:
        return Family.IPV4 if self.address.version == 4 else Family.IPV6


class Ping(NamedTuple):
    """PING: answered OK once the helper serves; carries nothing else."""

    request_id: int


# The two requests there are; code that handles one names it with isinstance.
Request = Create | Ping


class Reply(NamedTuple):
    status: Status
    request_id: int
    detail: int = 0  # errno for OS_ERROR, retry-after ms for RATE_LIMITED
    code: int = 0  # Stage for OS_ERROR, Reason for DENIED

    @property
    def stage(self) -> Stage | None:
        return Stage(self.code) if self.status is Status.OS_ERROR else None

    @property
    def reason(self) -> Reason | None:
        return Reason(self.code) if self.status is Status.DENIED else None


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ProtocolError(f"{name} {value} does not fit in 32 bits")


def _check_create_fields(req: Create) -> None:
    # The types say so, but a caller's bug must fail here, not in struct.pack.
    if not isinstance(req.transport, Transport) or not isinstance(req.address, _ADDRESS_TYPES):
        raise ProtocolError("CREATE needs a transport and an address", req.request_id)
    if not 1 <= req.port <= 0xFFFF:
        raise ProtocolError(f"port {req.port} is outside 1-65535", req.request_id)
    if req.address.version == 6 and req.address.scope_id is not None:
        raise ProtocolError("a request carries no IPv6 scope", req.request_id)
    # int(): on an IntFlag, ~ALL_OPTIONS keeps only known bits and would be 0;
    # plain ints are also several times faster than IntFlag arithmetic.
    options = int(req.options)
    if options & ~_ALL_OPTIONS:
        raise ProtocolError(f"unknown option bits {options:#x}", req.request_id)
    if options & _V6ONLY and req.address.version == 4:
        raise ProtocolError("V6ONLY is only valid for IPv6", req.request_id)


def encode_request(req: Request) -> bytes:
    """32 bytes for ``req``. Refuses to encode anything decode_request would reject,
    so a caller's bug fails here instead of on the wire."""
    _check_u32("request id", req.request_id)
    if isinstance(req, Ping):
        return _REQUEST.pack(MAGIC, VERSION, Op.PING, req.request_id, 0, 0, 0, _ZERO16, 0, 0)
    if not isinstance(req, Create):
        raise ProtocolError(f"not a request: {req!r}", req.request_id)
    _check_create_fields(req)
    packed = req.address.packed
    if req.address.version == 4:
        family, raw = Family.IPV4, packed + _ZERO12
    else:
        family, raw = Family.IPV6, packed
    return _REQUEST.pack(
        MAGIC, VERSION, Op.CREATE, req.request_id,
        req.transport, family, req.port, raw, int(req.options), 0,
    )  # fmt: skip


def peek_request_id(data: bytes) -> int:
    """The id a reply to ``data`` must carry: bytes 4-7, or 0 if the message is shorter."""
    return int.from_bytes(data[4:8], "big") if len(data) >= 8 else 0


def decode_request(data: bytes) -> Request:
    """Parse one request, or raise ProtocolError naming the first rule it breaks."""
    if len(data) != REQUEST_SIZE:
        raise ProtocolError(f"request is {len(data)} bytes, not {REQUEST_SIZE}",
                            peek_request_id(data))  # fmt: skip
    # One unpack into integers (the address as two 64-bit halves); every check
    # below is an integer comparison.
    magic, version, op, rid, transport, family, port, high, low, options, reserved = (
        _REQUEST_INTS.unpack_from(data)
    )
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}", rid)
    if version != VERSION:
        raise ProtocolError(f"unsupported version {version}", rid)
    if op == _PING:
        if transport or family or port or high or low or options or reserved:
            raise ProtocolError("PING must have bytes 8-31 zero", rid)
        return Ping(rid)
    if op != _CREATE:
        raise ProtocolError(f"unknown op {op}", rid)
    if reserved:
        raise ProtocolError("reserved bytes 30-31 are not zero", rid)
    kind = _TRANSPORTS.get(transport)
    if kind is None:
        raise ProtocolError(f"unknown transport {transport}", rid)
    if family == _IPV4:
        if high & 0xFFFFFFFF or low:
            raise ProtocolError("IPv4 address padding (bytes 16-27) is not zero", rid)
        address: IPAddress = ipaddress.IPv4Address(high >> 32)
    elif family == _IPV6:
        address = ipaddress.IPv6Address(high << 64 | low)
    else:
        raise ProtocolError(f"unknown family {family}", rid)
    # The rest of _check_create_fields, in its order (the port fits 16 bits).
    if not port:
        raise ProtocolError(f"port {port} is outside 1-65535", rid)
    if options > _ALL_OPTIONS:
        raise ProtocolError(f"unknown option bits {options:#x}", rid)
    if options & _V6ONLY and family == _IPV4:
        raise ProtocolError("V6ONLY is only valid for IPv6", rid)
    return Create(rid, kind, address, port, _OPTIONS[options])


def encode_reply(reply: Reply) -> bytes:
    _check_u32("request id", reply.request_id)
    _check_u32("detail", reply.detail)
    if not 0 <= reply.code <= 0xFF:
        raise ProtocolError(f"code {reply.code} does not fit in one byte", reply.request_id)
    return _REPLY.pack(
        MAGIC, VERSION, reply.status, reply.request_id, reply.detail, reply.code, b"\0\0\0"
    )


def decode_reply(data: bytes) -> Reply:
    """Parse one reply, or raise ProtocolError. The boss treats that as fatal:
    a helper that breaks the protocol is not trusted further."""
    if len(data) != REPLY_SIZE:
        raise ProtocolError(f"reply is {len(data)} bytes, not {REPLY_SIZE}")
    magic, version, status, rid, detail, code, reserved = _REPLY.unpack(data)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError("reply has a bad magic or version", rid)
    if reserved != b"\0\0\0":
        raise ProtocolError("reply reserved bytes are not zero", rid)
    try:
        st = Status(status)
    except ValueError:
        raise ProtocolError(f"unknown reply status {status}", rid) from None
    valid_codes: tuple[type[enum.IntEnum], ...] = ()
    if st is Status.OS_ERROR:
        valid_codes = (Stage,)
    elif st is Status.DENIED:
        valid_codes = (Reason,)
    if valid_codes:
        if code not in {int(m) for m in valid_codes[0]}:
            raise ProtocolError(f"reply code {code} is not valid for {st.name}", rid)
    elif code:
        raise ProtocolError(f"{st.name} reply has a non-zero code", rid)
    if st in (Status.OK, Status.DENIED, Status.MALFORMED) and detail:
        raise ProtocolError(f"{st.name} reply has a non-zero detail", rid)
    return Reply(st, rid, detail, code)


def reply_carries_fd(reply: Reply, request: Request | None) -> bool:
    """True exactly when this reply must carry one fd: OK to a CREATE."""
    return reply.status is Status.OK and isinstance(request, Create)


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """Every fd in the SCM_RIGHTS messages of a recvmsg's ancillary data, in order.
    A trailing partial int (a truncated message) is not an fd and is left out."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return fds.tolist()


# Replies the helper builds; small constructors keep the field rules in one place.


def ok(request_id: int) -> Reply:
    return Reply(Status.OK, request_id)


def denied(request_id: int, reason: Reason) -> Reply:
    return Reply(Status.DENIED, request_id, 0, reason)


def rate_limited(request_id: int, retry_after_ms: int) -> Reply:
    return Reply(Status.RATE_LIMITED, request_id, max(1, min(retry_after_ms, 0xFFFFFFFF)))


def malformed(request_id: int) -> Reply:
    return Reply(Status.MALFORMED, request_id)


def os_error(request_id: int, errno: int, stage: Stage) -> Reply:
    return Reply(Status.OS_ERROR, request_id, errno, stage)
