"""The wire codec (privsock.helper.protocol): exact layouts, every malformed case, and
properties over arbitrary and bit-flipped messages. Pure: no sockets, no root."""

from __future__ import annotations

import array
import ipaddress
import itertools
import socket
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privsock.helper.protocol import (
    ALL_OPTIONS,
    MAGIC,
    REPLY_SIZE,
    REQUEST_SIZE,
    VERSION,
    Create,
    Family,
    Op,
    Option,
    Ping,
    ProtocolError,
    Reason,
    Reply,
    Request,
    Stage,
    Status,
    Transport,
    decode_reply,
    decode_request,
    denied,
    encode_reply,
    encode_request,
    malformed,
    ok,
    os_error,
    peek_request_id,
    rate_limited,
    received_fds,
    reply_carries_fd,
)
from tests import legacy_helper

V4 = ipaddress.IPv4Address("192.0.2.10")
V6 = ipaddress.IPv6Address("2001:db8::1")
RID = 0x01020304
U32_MAX = 0xFFFFFFFF


def hand_request(
    *,
    op: int = 1,
    rid: int = RID,
    transport: int = 1,
    family: int = 4,
    port: int = 53,
    address: bytes = bytes([192, 0, 2, 10]) + bytes(12),
    options: int = 0,
    reserved: int = 0,
    magic: bytes = b"PS",
    version: int = 1,
) -> bytes:
    """A request built byte by byte from the offset table, not via struct."""
    b = bytearray(32)
    b[0:2] = magic
    b[2] = version
    b[3] = op
    b[4:8] = rid.to_bytes(4, "big")
    b[8] = transport
    b[9] = family
    b[10:12] = port.to_bytes(2, "big")
    assert len(address) == 16
    b[12:28] = address
    b[28:30] = options.to_bytes(2, "big")
    b[30:32] = reserved.to_bytes(2, "big")
    return bytes(b)


def hand_reply(
    *,
    status: int,
    rid: int = RID,
    detail: int = 0,
    code: int = 0,
    reserved: bytes = b"\0\0\0",
    magic: bytes = b"PS",
    version: int = 1,
) -> bytes:
    b = bytearray(16)
    b[0:2] = magic
    b[2] = version
    b[3] = status
    b[4:8] = rid.to_bytes(4, "big")
    b[8:12] = detail.to_bytes(4, "big")
    b[12] = code
    b[13:16] = reserved
    return bytes(b)


VALID_V4 = hand_request()
VALID_V6 = hand_request(family=6, transport=2, port=443, address=V6.packed, options=7)
VALID_PING = hand_request(op=2, transport=0, family=0, port=0, address=bytes(16))


def with_byte(data: bytes, offset: int, value: int) -> bytes:
    b = bytearray(data)
    b[offset] = value
    return bytes(b)


def assert_malformed(data: bytes, request_id: int = RID) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_request(data)
    assert type(info.value) is ProtocolError
    assert info.value.request_id == request_id
    return info.value


# ---------------------------------------------------------------------------
# Constants and the wire layout


def test_sizes_and_constants() -> None:
    assert (MAGIC, VERSION, REQUEST_SIZE, REPLY_SIZE) == (b"PS", 1, 32, 16)
    assert ALL_OPTIONS == 7
    assert [int(f) for f in Family] == [4, 6]


def test_v4_request_layout_literal() -> None:
    req = Create(RID, Transport.TCP, V4, 443, Option.REUSEADDR | Option.REUSEPORT)
    expected = bytes.fromhex(
        "5053"  # 0-1 magic
        "01"  # 2 version
        "01"  # 3 op CREATE
        "01020304"  # 4-7 id
        "02"  # 8 transport TCP
        "04"  # 9 family 4
        "01bb"  # 10-11 port 443
        "c000020a" + "00" * 12 + "0003"  # 12-27 address, 28-29 options
        "0000"  # 30-31 reserved
    )
    assert len(expected) == 32
    assert encode_request(req) == expected
    assert decode_request(expected) == req
    assert expected == hand_request(transport=2, port=443, options=3)


def test_v6_request_layout() -> None:
    addr = ipaddress.IPv6Address("2001:db8:1:2:3:4:5:6")
    req = Create(0xFFFFFFFE, Transport.UDP, addr, 0xFFFF, Option.V6ONLY)
    data = encode_request(req)
    assert data[0:2] == b"PS"
    assert data[2] == 1
    assert data[3] == 1
    assert data[4:8] == b"\xff\xff\xff\xfe"
    assert data[8] == 1
    assert data[9] == 6
    assert data[10:12] == b"\xff\xff"
    assert data[12:28] == bytes.fromhex("20010db8000100020003000400050006")
    assert data[28:30] == b"\x00\x04"
    assert data[30:32] == b"\x00\x00"
    assert data == hand_request(
        rid=0xFFFFFFFE, family=6, port=0xFFFF, address=addr.packed, options=4
    )
    assert decode_request(data) == req
    assert decode_request(data).family is Family.IPV6


def test_port_is_big_endian() -> None:
    data = encode_request(Create(1, Transport.UDP, V4, 0x1234))
    assert data[10:12] == b"\x12\x34"


def test_ping_layout() -> None:
    data = encode_request(Ping(RID))
    assert data == b"PS\x01\x02\x01\x02\x03\x04" + bytes(24)
    assert data == VALID_PING
    req = decode_request(data)
    assert req == Ping(RID)
    assert type(req) is Ping  # no fields beyond the id, so nothing downstream can misread


REPLY_CASES = [
    (ok(RID), hand_reply(status=0)),
    (denied(RID, Reason.ADDRESS), hand_reply(status=1, code=2)),
    (rate_limited(RID, 1500), hand_reply(status=2, detail=1500)),
    (malformed(RID), hand_reply(status=3)),
    (os_error(RID, 98, Stage.BIND), hand_reply(status=4, detail=98, code=3)),
]


@pytest.mark.parametrize(("reply", "wire"), REPLY_CASES, ids=lambda x: getattr(x, "status", ""))
def test_reply_layout(reply: Reply, wire: bytes) -> None:
    assert encode_reply(reply) == wire
    assert decode_reply(wire) == reply


def test_reply_layout_literal() -> None:
    wire = encode_reply(os_error(0xA1B2C3D4, 0x0102_0304, Stage.SETSOCKOPT))
    assert wire == bytes.fromhex("5053 01 04 a1b2c3d4 01020304 02 000000")


def test_reply_accessors() -> None:
    assert os_error(1, 13, Stage.SOCKET).stage is Stage.SOCKET
    assert os_error(1, 13, Stage.SOCKET).reason is None
    assert denied(1, Reason.OPTION).reason is Reason.OPTION
    assert denied(1, Reason.OPTION).stage is None
    assert ok(1).stage is None and ok(1).reason is None


def test_rate_limited_clamps_detail() -> None:
    assert rate_limited(1, 0).detail == 1
    assert rate_limited(1, -5).detail == 1
    assert rate_limited(1, 250).detail == 250
    assert rate_limited(1, 2**40).detail == U32_MAX
    assert decode_reply(encode_reply(rate_limited(1, 2**40))).detail == U32_MAX


# ---------------------------------------------------------------------------
# Round trips

ADDRESSES = [
    ipaddress.IPv4Address("0.0.0.0"),
    ipaddress.IPv4Address("127.0.0.1"),
    ipaddress.IPv4Address("255.255.255.255"),
    ipaddress.IPv6Address("::"),
    ipaddress.IPv6Address("::1"),
    ipaddress.IPv6Address("::ffff:192.0.2.1"),
    ipaddress.IPv6Address("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
]
OPTION_SETS = [Option(n) for n in range(8)]


CREATE_CASES = [
    (transport, address, options)
    for transport in Transport
    for address in ADDRESSES
    for options in OPTION_SETS
    if address.version == 6 or not options & Option.V6ONLY  # V6ONLY on v4: refusal tests
]


@pytest.mark.parametrize(
    ("transport", "address", "options"),
    CREATE_CASES,
    ids=[f"{t.name}-{a}-opt{int(o)}" for t, a, o in CREATE_CASES],
)
def test_create_round_trip(
    transport: Transport, address: ipaddress.IPv4Address | ipaddress.IPv6Address, options: Option
) -> None:
    for port in (1, 53, 65535):
        for rid in (0, 1, RID, U32_MAX):
            req = Create(rid, transport, address, port, options)
            data = encode_request(req)
            assert len(data) == REQUEST_SIZE
            back = decode_request(data)
            assert back == req
            assert back.family == (Family.IPV4 if address.version == 4 else Family.IPV6)
            assert data[9] == address.version
            assert encode_request(back) == data


@pytest.mark.parametrize("rid", [0, 1, RID, U32_MAX])
def test_ping_round_trip(rid: int) -> None:
    assert decode_request(encode_request(Ping(rid))) == Ping(rid)


@pytest.mark.parametrize("rid", [0, 1, U32_MAX])
def test_reply_round_trips(rid: int) -> None:
    replies = [ok(rid), malformed(rid), rate_limited(rid, 1), rate_limited(rid, U32_MAX)]
    replies += [denied(rid, r) for r in Reason]
    replies += [os_error(rid, e, s) for s in Stage for e in (0, 1, 98, U32_MAX)]
    for reply in replies:
        assert decode_reply(encode_reply(reply)) == reply


# ---------------------------------------------------------------------------
# Malformed requests: every rule, with the id a reply must echo


def test_hand_built_bases_are_valid() -> None:
    assert decode_request(VALID_V4) == Create(RID, Transport.UDP, V4, 53)
    assert decode_request(VALID_V6) == Create(RID, Transport.TCP, V6, 443, ALL_OPTIONS)
    assert decode_request(VALID_PING) == Ping(RID)


@pytest.mark.parametrize("length", [n for n in range(65) if n != REQUEST_SIZE])
def test_every_wrong_length(length: int) -> None:
    data = (VALID_V4 + VALID_V4)[:length]
    assert_malformed(data, RID if length >= 8 else 0)
    # A PING prefix or a zero-padded valid PING is just as wrong.
    assert_malformed((VALID_PING + bytes(32))[:length], RID if length >= 8 else 0)


def test_short_message_id_is_zero_even_if_partly_present() -> None:
    assert assert_malformed(VALID_V4[:7], 0).request_id == 0
    assert peek_request_id(VALID_V4[:7]) == 0
    assert peek_request_id(VALID_V4[:8]) == RID


@pytest.mark.parametrize("magic", [b"XS", b"PX", b"ps", b"SP", b"\0\0", b"\xff\xff"])
@pytest.mark.parametrize("base", ["v4", "ping"])
def test_bad_magic(magic: bytes, base: str) -> None:
    data = VALID_V4 if base == "v4" else VALID_PING
    assert_malformed(magic + data[2:])


@pytest.mark.parametrize("version", [0, 2, 3, 0x81, 255])
@pytest.mark.parametrize("base", ["v4", "ping"])
def test_bad_version(version: int, base: str) -> None:
    assert_malformed(with_byte(VALID_V4 if base == "v4" else VALID_PING, 2, version))


@pytest.mark.parametrize("op", [0, 3, 4, 127, 255])
@pytest.mark.parametrize("base", ["v4", "ping"])
def test_unknown_op(op: int, base: str) -> None:
    assert_malformed(with_byte(VALID_V4 if base == "v4" else VALID_PING, 3, op))


@pytest.mark.parametrize("transport", [0, 3, 4, 255])
@pytest.mark.parametrize("base", ["v4", "v6"])
def test_unknown_transport(transport: int, base: str) -> None:
    assert_malformed(with_byte(VALID_V4 if base == "v4" else VALID_V6, 8, transport))


@pytest.mark.parametrize("family", [0, 1, 2, 5, 7, 41, 255])
def test_unknown_family(family: int) -> None:
    assert_malformed(with_byte(VALID_V4, 9, family))
    assert_malformed(hand_request(family=family, address=V6.packed))


@pytest.mark.parametrize("base", ["v4", "v6"])
def test_port_zero(base: str) -> None:
    data = VALID_V4 if base == "v4" else VALID_V6
    assert_malformed(data[:10] + b"\0\0" + data[12:])


@pytest.mark.parametrize("offset", range(16, 28))
@pytest.mark.parametrize("value", [1, 0x80, 0xFF])
def test_nonzero_ipv4_padding(offset: int, value: int) -> None:
    assert_malformed(with_byte(VALID_V4, offset, value))
    # The same bytes are a legitimate part of an IPv6 address.
    v6 = with_byte(hand_request(family=6), offset, value)
    assert decode_request(v6).address == ipaddress.IPv6Address(v6[12:28])


@pytest.mark.parametrize("bit", range(3, 16))
@pytest.mark.parametrize("base", ["v4", "v6"])
def test_unknown_option_bit(bit: int, base: str) -> None:
    if base == "v4":
        data = hand_request(options=1 << bit)
        data_with_known = hand_request(options=(1 << bit) | 3)
    else:
        data = hand_request(family=6, address=V6.packed, options=1 << bit)
        data_with_known = hand_request(family=6, address=V6.packed, options=(1 << bit) | 7)
    assert_malformed(data)
    assert_malformed(data_with_known)


@pytest.mark.parametrize("options", [4, 5, 6, 7])
def test_v6only_on_ipv4(options: int) -> None:
    assert_malformed(hand_request(options=options))
    # The same options are fine on IPv6, including for an IPv4-mapped address.
    mapped = ipaddress.IPv6Address("::ffff:192.0.2.10")
    assert decode_request(hand_request(family=6, address=mapped.packed, options=options))


@pytest.mark.parametrize("offset", [30, 31])
@pytest.mark.parametrize("value", [1, 0x80, 0xFF])
@pytest.mark.parametrize("base", ["v4", "v6"])
def test_nonzero_reserved(offset: int, value: int, base: str) -> None:
    assert_malformed(with_byte(VALID_V4 if base == "v4" else VALID_V6, offset, value))


@pytest.mark.parametrize("offset", range(8, 32))
@pytest.mark.parametrize("value", [1, 0xFF])
def test_ping_with_nonzero_field(offset: int, value: int) -> None:
    assert_malformed(with_byte(VALID_PING, offset, value))


def test_ping_shaped_like_a_create() -> None:
    """A PING carrying a whole valid CREATE body is still malformed."""
    assert_malformed(with_byte(VALID_V4, 3, Op.PING))


def test_error_messages_name_the_rule() -> None:
    assert "magic" in str(assert_malformed(b"XX" + VALID_V4[2:]))
    assert "version" in str(assert_malformed(with_byte(VALID_V4, 2, 9)))
    assert "op" in str(assert_malformed(with_byte(VALID_V4, 3, 9)))
    assert "transport" in str(assert_malformed(with_byte(VALID_V4, 8, 9)))
    assert "family" in str(assert_malformed(with_byte(VALID_V4, 9, 9)))
    assert "port" in str(assert_malformed(hand_request(port=0)))
    assert "padding" in str(assert_malformed(with_byte(VALID_V4, 20, 1)))
    assert "option" in str(assert_malformed(hand_request(options=8)))
    assert "V6ONLY" in str(assert_malformed(hand_request(options=4)))
    assert "reserved" in str(assert_malformed(with_byte(VALID_V4, 31, 1)))
    assert "32" in str(assert_malformed(VALID_V4[:31]))


# ---------------------------------------------------------------------------
# Malformed replies


@pytest.mark.parametrize("length", [n for n in range(40) if n != REPLY_SIZE])
def test_reply_wrong_length(length: int) -> None:
    good = hand_reply(status=0)
    with pytest.raises(ProtocolError):
        decode_reply((good + good + good)[:length])


@pytest.mark.parametrize("magic", [b"XS", b"PX", b"ps", b"\0\0"])
def test_reply_bad_magic(magic: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_reply(magic + hand_reply(status=0)[2:])
    assert info.value.request_id == RID


@pytest.mark.parametrize("version", [0, 2, 255])
def test_reply_bad_version(version: int) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_reply(hand_reply(status=0, version=version))
    assert info.value.request_id == RID


@pytest.mark.parametrize("status", [5, 6, 127, 255])
def test_reply_unknown_status(status: int) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_reply(hand_reply(status=status))
    assert info.value.request_id == RID


@pytest.mark.parametrize("offset", [13, 14, 15])
@pytest.mark.parametrize("status", list(Status))
def test_reply_nonzero_reserved(offset: int, status: Status) -> None:
    code = 1 if status in (Status.DENIED, Status.OS_ERROR) else 0
    good = hand_reply(status=status, code=code)
    decode_reply(good)
    with pytest.raises(ProtocolError):
        decode_reply(with_byte(good, offset, 1))


INVALID_CODES = [
    (Status.OK, [1, 2, 255]),
    (Status.MALFORMED, [1, 255]),
    (Status.RATE_LIMITED, [1, 255]),
    (Status.DENIED, [0, 5, 255]),
    (Status.OS_ERROR, [0, 5, 255]),
]


@pytest.mark.parametrize(("status", "code"), [(s, c) for s, codes in INVALID_CODES for c in codes])
def test_reply_code_invalid_for_status(status: Status, code: int) -> None:
    detail = 5 if status in (Status.RATE_LIMITED, Status.OS_ERROR) else 0
    with pytest.raises(ProtocolError) as info:
        decode_reply(hand_reply(status=status, detail=detail, code=code))
    assert info.value.request_id == RID


@pytest.mark.parametrize("status", [Status.OK, Status.DENIED, Status.MALFORMED])
@pytest.mark.parametrize("detail", [1, 0x100, U32_MAX])
def test_reply_detail_must_be_zero(status: Status, detail: int) -> None:
    code = Reason.PORT if status is Status.DENIED else 0
    decode_reply(hand_reply(status=status, code=code))
    with pytest.raises(ProtocolError):
        decode_reply(hand_reply(status=status, detail=detail, code=code))


def test_reply_valid_codes_accepted() -> None:
    for reason in Reason:
        assert decode_reply(hand_reply(status=1, code=reason)).reason is reason
    for stage in Stage:
        assert decode_reply(hand_reply(status=4, detail=13, code=stage)).stage is stage


def test_encode_reply_refuses_out_of_range() -> None:
    for bad in (
        Reply(Status.OK, U32_MAX + 1),
        Reply(Status.OK, -1),
        Reply(Status.OS_ERROR, 1, U32_MAX + 1, Stage.BIND),
        Reply(Status.OS_ERROR, 1, -1, Stage.BIND),
        Reply(Status.DENIED, 1, 0, 256),
        Reply(Status.DENIED, 1, 0, -1),
    ):
        with pytest.raises(ProtocolError):
            encode_reply(bad)


# ---------------------------------------------------------------------------
# reply_carries_fd


@pytest.mark.parametrize("status", list(Status))
@pytest.mark.parametrize("request_kind", ["none", "ping", "create4", "create6"])
def test_reply_carries_fd_truth_table(status: Status, request_kind: str) -> None:
    request = {
        "none": None,
        "ping": Ping(1),
        "create4": Create(1, Transport.UDP, V4, 53),
        "create6": Create(1, Transport.TCP, V6, 53),
    }[request_kind]
    reply = Reply(status, 1)
    expected = status is Status.OK and request_kind.startswith("create")
    assert reply_carries_fd(reply, request) is expected


# ---------------------------------------------------------------------------
# encode_request refuses what decode_request would reject


@pytest.mark.parametrize(
    "req",
    [
        Create(1, Transport.UDP, V4, 0),
        Create(1, Transport.UDP, V4, 65536),
        Create(1, Transport.UDP, V4, -1),
        Create(1, Transport.UDP, V6, 0),
        Create(1, Transport.UDP, V4, 53, Option.V6ONLY),
        Create(1, Transport.TCP, V4, 53, ALL_OPTIONS),
        Create(1, Transport.UDP, V4, 53, Option(8)),
        Create(1, Transport.UDP, V6, 53, Option(0x8000)),
        Create(1, Transport.UDP, V6, 53, Option(0x10000)),
        Create(U32_MAX + 1, Transport.UDP, V4, 53),
        Create(-1, Transport.UDP, V4, 53),
        Ping(U32_MAX + 1),
        Ping(-1),
        # A PING has no fields to get wrong; a CREATE's types can still be broken at run time.
        Create(1, None, V4, 53),  # type: ignore[arg-type]
        Create(1, Transport.UDP, None, 53),  # type: ignore[arg-type]
        Create(1, 1, V4, 53),  # type: ignore[arg-type]
        Create(1, Transport.UDP, "127.0.0.1", 53),  # type: ignore[arg-type]
    ],
    ids=repr,
)
def test_encode_request_refuses(req: Request) -> None:
    with pytest.raises(ProtocolError):
        encode_request(req)


def test_encode_request_accepts_the_edges() -> None:
    assert decode_request(encode_request(Create(U32_MAX, Transport.UDP, V4, 65535))).port == 65535
    assert decode_request(encode_request(Create(0, Transport.UDP, V4, 1))).request_id == 0


# ---------------------------------------------------------------------------
# Properties

addresses = st.one_of(
    st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)),
    st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)),
)
request_ids = st.integers(0, U32_MAX)


@st.composite
def valid_requests(draw: st.DrawFn) -> Request:
    rid = draw(request_ids)
    if draw(st.booleans()):
        return Ping(rid)
    address = draw(addresses)
    options = Option(draw(st.integers(0, 7 if address.version == 6 else 3)))
    return Create(rid, draw(st.sampled_from(Transport)), address, draw(st.integers(1, 65535)),
                  options)  # fmt: skip


@st.composite
def valid_replies(draw: st.DrawFn) -> Reply:
    rid = draw(request_ids)
    status = draw(st.sampled_from(Status))
    if status is Status.DENIED:
        return denied(rid, draw(st.sampled_from(Reason)))
    if status is Status.OS_ERROR:
        return os_error(rid, draw(st.integers(0, U32_MAX)), draw(st.sampled_from(Stage)))
    if status is Status.RATE_LIMITED:
        return Reply(status, rid, draw(st.integers(0, U32_MAX)))
    return Reply(status, rid)


@given(st.binary(max_size=80))
def test_decode_request_arbitrary_bytes(data: bytes) -> None:
    try:
        req = decode_request(data)
    except ProtocolError as exc:
        assert exc.request_id == (int.from_bytes(data[4:8], "big") if len(data) >= 8 else 0)
    else:
        assert encode_request(req) == data


@given(
    st.sampled_from([1, 2, 0, 3]),
    st.binary(min_size=28, max_size=28),
    st.sampled_from([b"\0\0", b"\0\x01", b"\x01\0"]),
)
def test_decode_request_plausible_bytes(op: int, body: bytes, reserved: bytes) -> None:
    """Structured noise that gets past magic/version, so the deeper rules are reached."""
    data = b"PS\x01" + bytes([op]) + body[:26] + reserved
    assert len(data) == 32
    try:
        req = decode_request(data)
    except ProtocolError as exc:
        assert exc.request_id == int.from_bytes(data[4:8], "big")
    else:
        assert encode_request(req) == data


def _decoded(decode: Callable[[bytes], Request], data: bytes) -> object:
    """What ``decode`` makes of ``data``: the request, or the error's text and id."""
    try:
        return decode(data)
    except ProtocolError as exc:
        return (str(exc), exc.request_id)


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << bit % 8
    return bytes(flipped)


_noisy = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda op, body: b"PS\x01" + bytes([op]) + body,
        st.sampled_from([1, 2, 0, 3]),
        st.lists(st.sampled_from([0, 0, 0, 1, 2, 4, 6, 7, 8, 0xFF]), min_size=28, max_size=28).map(
            bytes
        ),
    ),
    st.builds(_flip, valid_requests().map(encode_request), st.integers(0, REQUEST_SIZE * 8 - 1)),
)


@given(_noisy)
@settings(max_examples=2000)
def test_decode_request_is_the_previous_decoder(data: bytes) -> None:
    """The same request, or the same error text and id, as tests/legacy_helper.py."""
    got = _decoded(decode_request, data)
    assert got == _decoded(legacy_helper.decode_request, data)
    if isinstance(got, Create):  # the same types too, not just equal values
        assert type(got.transport) is Transport and type(got.options) is Option
        assert type(got.address) is type(legacy_helper.decode_request(data).address)  # type: ignore[union-attr]


@given(valid_requests())
def test_request_encode_decode_identity(req: Request) -> None:
    data = encode_request(req)
    assert len(data) == REQUEST_SIZE
    assert decode_request(data) == req
    assert encode_request(decode_request(data)) == data


@given(valid_requests(), st.integers(0, REQUEST_SIZE * 8 - 1))
def test_request_single_bit_flip(req: Request, bit: int) -> None:
    flipped = bytearray(encode_request(req))
    flipped[bit // 8] ^= 1 << (bit % 8)
    try:
        back = decode_request(bytes(flipped))
    except ProtocolError as exc:
        assert exc.request_id == int.from_bytes(flipped[4:8], "big")
    else:
        assert encode_request(back) == bytes(flipped)


def test_request_every_bit_flip_exhaustively() -> None:
    """All 256 flips of three fixed requests; the counts pin which fields are checked."""
    for base in (VALID_V4, VALID_V6, VALID_PING):
        accepted = 0
        for bit in range(REQUEST_SIZE * 8):
            flipped = bytearray(base)
            flipped[bit // 8] ^= 1 << (bit % 8)
            try:
                back = decode_request(bytes(flipped))
            except ProtocolError:
                continue
            accepted += 1
            assert encode_request(back) == bytes(flipped)
        if base is VALID_PING:
            assert accepted == 32  # only the id bits
        elif base is VALID_V4:
            # id 32 + port 16 (53 has several bits set, so no flip makes it 0) +
            # address 32 + options REUSEADDR/REUSEPORT 2 + family 4->6 (the zero
            # padding is a legal IPv6 tail) 1. Transport, padding, V6ONLY and all
            # unknown option bits must fail.
            assert accepted == 32 + 16 + 32 + 2 + 1
        else:
            # id 32 + port 16 + address 128 + options 3 (clearing any of the three);
            # transport 2->0, 2->3 fail.
            assert accepted == 32 + 16 + 128 + 3


@given(st.binary(max_size=40))
def test_decode_reply_arbitrary_bytes(data: bytes) -> None:
    try:
        reply = decode_reply(data)
    except ProtocolError:
        pass
    else:
        assert encode_reply(reply) == data


@given(valid_replies())
def test_reply_encode_decode_identity(reply: Reply) -> None:
    data = encode_reply(reply)
    assert len(data) == REPLY_SIZE
    assert decode_reply(data) == reply
    assert encode_reply(decode_reply(data)) == data


@given(valid_replies(), st.integers(0, REPLY_SIZE * 8 - 1))
def test_reply_single_bit_flip(reply: Reply, bit: int) -> None:
    flipped = bytearray(encode_reply(reply))
    flipped[bit // 8] ^= 1 << (bit % 8)
    try:
        back = decode_reply(bytes(flipped))
    except ProtocolError:
        return
    assert encode_reply(back) == bytes(flipped)


def test_every_status_code_detail_combination() -> None:
    """Exhaustive over status x code (all 256) x detail in {0, 1}: exactly the legal
    combinations decode, and each re-encodes to the same bytes."""
    legal = {
        Status.OK: ({0}, {0}),
        Status.MALFORMED: ({0}, {0}),
        Status.DENIED: ({int(r) for r in Reason}, {0}),
        Status.RATE_LIMITED: ({0}, {0, 1}),
        Status.OS_ERROR: ({int(s) for s in Stage}, {0, 1}),
    }
    for status, code, detail in itertools.product(range(8), range(256), (0, 1)):
        wire = hand_reply(status=status, code=code, detail=detail)
        ok_expected = (
            status in legal and code in legal[Status(status)][0]
            and detail in legal[Status(status)][1]
        )  # fmt: skip
        if ok_expected:
            assert encode_reply(decode_reply(wire)) == wire
        else:
            with pytest.raises(ProtocolError):
                decode_reply(wire)


# ---------------------------------------------------------------------------
# received_fds: the one SCM_RIGHTS parser both sides, the tests and the fuzzers use


def test_received_fds_takes_every_scm_rights_message_in_order() -> None:
    def rights(*fds: int) -> tuple[int, int, bytes]:
        return socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()

    creds = (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, bytes(12))
    assert received_fds([]) == []
    assert received_fds([rights(5), creds, rights(7, 9)]) == [5, 7, 9]
    # A message cut short by MSG_CTRUNC may end in part of an int: that is no fd.
    level, kind, data = rights(3, 4)
    assert received_fds([(level, kind, data[:-1])]) == [3]
    assert received_fds([creds]) == []
