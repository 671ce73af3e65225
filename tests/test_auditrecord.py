"""The audit line format (privsock.helper.auditrecord): pure record building, encoding, parsing."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from privsock.auditjson import encode, parse, record
from privsock.helper.auditrecord import FIELDS, Lines, address_text, option_names, rfc3339
from privsock.helper.protocol import Create, Option, Ping, Transport

V4 = ipaddress.IPv4Address("192.0.2.10")
V6 = ipaddress.IPv6Address("2001:db8::1")
NOW = 1795723200.5  # 2026-11-26T20:00:00.5Z
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def test_fields_are_the_documented_ones() -> None:
    assert FIELDS == (
        "time", "side", "pid", "id", "op", "transport", "address", "port", "options",
        "decision", "reason", "rule", "errno", "retry_ms", "peer_uid", "peer_pid",
        "user", "command",
    )  # fmt: skip


def test_record_for_a_granted_create() -> None:
    req = Create(7, Transport.UDP, V6, 53, Option.REUSEADDR | Option.V6ONLY)
    rec = record(now=NOW, side="helper", pid=4242, request_id=7, request=req,
                 decision="granted", rule="allow[0]", peer_uid=1001, peer_pid=77)  # fmt: skip
    assert tuple(rec) == FIELDS
    assert rec == {
        "time": "2026-11-26T20:00:00.500000Z",
        "side": "helper",
        "pid": 4242,
        "id": 7,
        "op": "CREATE",
        "transport": "udp",
        "address": "2001:db8::1",
        "port": 53,
        "options": ["reuseaddr", "v6only"],
        "decision": "granted",
        "reason": None,
        "rule": "allow[0]",
        "errno": None,
        "retry_ms": None,
        "peer_uid": 1001,
        "peer_pid": 77,
        "user": None,
        "command": None,
    }


def test_record_for_os_error_and_rate_limited() -> None:
    req = Create(9, Transport.TCP, V4, 80)
    rec = record(now=0.0, side="helper", pid=1, request_id=9, request=req,
                 decision="os_error", reason="bind", rule="allow[1]", errno=98)  # fmt: skip
    assert (rec["transport"], rec["address"], rec["port"], rec["options"]) == (
        "tcp", "192.0.2.10", 80, [],
    )  # fmt: skip
    assert (rec["decision"], rec["reason"], rec["rule"], rec["errno"]) == (
        "os_error", "bind", "allow[1]", 98,
    )  # fmt: skip
    rec = record(now=0.0, side="boss", pid=2, request_id=9, request=req,
                 decision="rate_limited", retry_ms=125)  # fmt: skip
    assert (rec["side"], rec["errno"], rec["retry_ms"]) == ("boss", None, 125)


def test_record_for_malformed_has_nulls() -> None:
    rec = record(now=NOW, side="helper", pid=3, request_id=0, request=None,
                 decision="malformed", reason="request is 5 bytes, not 32")  # fmt: skip
    assert tuple(rec) == FIELDS
    assert rec["id"] == 0
    for key in ("op", "transport", "address", "port", "rule", "errno", "retry_ms", "peer_uid",
                "peer_pid", "user", "command"):  # fmt: skip
        assert rec[key] is None, key
    assert rec["options"] == []
    assert rec["reason"] == "request is 5 bytes, not 32"


def test_record_for_ping() -> None:
    rec = record(now=NOW, side="helper", pid=3, request_id=0xFFFFFFFF, request=Ping(0xFFFFFFFF),
                 decision="pong")  # fmt: skip
    assert rec["op"] == "PING"
    assert rec["id"] == 0xFFFFFFFF
    assert (rec["transport"], rec["address"], rec["port"], rec["options"]) == (None, None, None, [])


def test_record_keeps_wildcard_addresses() -> None:
    """0.0.0.0 and :: are falsy-looking but real addresses: they must be logged."""
    for addr in (ipaddress.IPv4Address("0.0.0.0"), ipaddress.IPv6Address("::")):
        rec = record(now=NOW, side="helper", pid=1, request_id=1,
                     request=Create(1, Transport.TCP, addr, 443), decision="granted")  # fmt: skip
        assert rec["address"] == str(addr)


def test_encode_is_one_compact_ascii_line_in_field_order() -> None:
    req = Create(7, Transport.TCP, V4, 443, Option.REUSEPORT)
    rec = record(now=NOW, side="helper", pid=4242, request_id=7, request=req,
                 decision="denied", reason="port", rule="deny[1]")  # fmt: skip
    line = encode(rec)
    assert isinstance(line, bytes)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert line == (
        b'{"time":"2026-11-26T20:00:00.500000Z","side":"helper","pid":4242,"id":7,'
        b'"op":"CREATE","transport":"tcp","address":"192.0.2.10","port":443,'
        b'"options":["reuseport"],"decision":"denied","reason":"port","rule":"deny[1]",'
        b'"errno":null,"retry_ms":null,"peer_uid":null,"peer_pid":null,"user":null,"command":null}\n'
    )
    assert tuple(json.loads(line)) == FIELDS


def test_encode_escapes_newlines_and_non_ascii() -> None:
    """A reason with a newline or non-ASCII text must not split or corrupt the line."""
    rec = record(now=NOW, side="helper", pid=1, request_id=1, request=None,
                 decision="malformed", reason="bad\nmagic b'\\xff' \u00e9\u2028")  # fmt: skip
    line = encode(rec)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert line.isascii()
    assert parse(line)["reason"] == "bad\nmagic b'\\xff' \u00e9\u2028"


@pytest.mark.parametrize("as_text", [False, True])
def test_parse_round_trips(as_text: bool) -> None:
    recs = [
        record(now=NOW, side="helper", pid=1, request_id=5,
               request=Create(5, Transport.UDP, V6, 1, Option(7)), decision="granted",
               rule="allow[2]"),
        record(now=0.0, side="boss", pid=2, request_id=0, request=None, decision="malformed",
               reason="bad magic"),
        record(now=NOW, side="helper", pid=3, request_id=6, request=Ping(6), decision="pong"),
    ]  # fmt: skip
    for rec in recs:
        line = encode(rec)
        back = parse(line.decode() if as_text else line)
        assert back == rec
        assert tuple(back) == FIELDS
        assert encode(back) == line


def valid_line() -> dict[str, object]:
    return record(now=NOW, side="helper", pid=1, request_id=1, request=None, decision="pong")


@pytest.mark.parametrize(
    "line",
    [
        "",
        "\n",
        "garbage",
        "{",
        "null",
        "1",
        '"a string"',
        "[]",
        "{}",
        json.dumps(list(FIELDS)),
        json.dumps(dict.fromkeys(reversed(FIELDS))),
        json.dumps({k: v for k, v in valid_line().items() if k != "retry_ms"}),
        json.dumps({**valid_line(), "extra": 1}),
        json.dumps({"extra": 1, **valid_line()}),
        b"\xff\xfe",
        b'{"time": "x"}\n',
    ],
)
def test_parse_rejects_non_audit_lines(line: str | bytes) -> None:
    with pytest.raises(ValueError):
        parse(line)


def test_parse_rejects_reordered_fields() -> None:
    rec = valid_line()
    swapped = dict(rec)
    swapped = {"side": swapped.pop("side"), **swapped}
    assert tuple(swapped) != FIELDS
    with pytest.raises(ValueError, match="not a privsock audit line"):
        parse(json.dumps(swapped))


# ---------------------------------------------------------------------------
# rfc3339


@pytest.mark.parametrize(
    ("now", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000000Z"),
        (0.5, "1970-01-01T00:00:00.500000Z"),
        (59.75, "1970-01-01T00:00:59.750000Z"),
        (86399.0, "1970-01-01T23:59:59.000000Z"),
        (951782400.25, "2000-02-29T00:00:00.250000Z"),  # leap day
        (1795723200.0, "2026-11-26T20:00:00.000000Z"),
        (1795723200.5, "2026-11-26T20:00:00.500000Z"),
        (2147483647.0, "2038-01-19T03:14:07.000000Z"),
        (2147483648.0, "2038-01-19T03:14:08.000000Z"),  # past 32-bit time_t
        (4102444799.0, "2099-12-31T23:59:59.000000Z"),
    ],
)
def test_rfc3339_known_epochs(now: float, text: str) -> None:
    assert rfc3339(now) == text


@pytest.mark.parametrize(
    ("now", "text"),
    [
        # Decimal fractions are not exact binary floats; the nearest microsecond
        # must be printed, not the float truncated (1.000001 is 1.00000099999...).
        (1.000001, "1970-01-01T00:00:01.000001Z"),
        (1.123456, "1970-01-01T00:00:01.123456Z"),
        (1700000000.000001, "2023-11-14T22:13:20.000001Z"),
        (1795723200.123456, "2026-11-26T20:00:00.123456Z"),
        (1795723200.999999, "2026-11-26T20:00:00.999999Z"),
        # Rounding up may carry into the next second.
        (0.9999999, "1970-01-01T00:00:01.000000Z"),
        (59.9999996, "1970-01-01T00:01:00.000000Z"),
    ],
)
def test_rfc3339_rounds_to_the_nearest_microsecond(now: float, text: str) -> None:
    assert rfc3339(now) == text


@given(st.floats(min_value=0.0, max_value=4102444800.0))
def test_rfc3339_agrees_with_datetime(now: float) -> None:
    text = rfc3339(now)
    assert RFC3339.fullmatch(text), text
    expected = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert text == expected


# ---------------------------------------------------------------------------
# option names


@pytest.mark.parametrize(
    ("options", "names"),
    [
        (Option(0), []),
        (Option.REUSEADDR, ["reuseaddr"]),
        (Option.REUSEPORT, ["reuseport"]),
        (Option.V6ONLY, ["v6only"]),
        (Option.REUSEADDR | Option.V6ONLY, ["reuseaddr", "v6only"]),
        (Option.V6ONLY | Option.REUSEPORT, ["reuseport", "v6only"]),
        (Option(7), ["reuseaddr", "reuseport", "v6only"]),
    ],
)
def test_option_names(options: Option, names: list[str]) -> None:
    assert option_names(options) == names


# ---------------------------------------------------------------------------
# Lines.line: the template both sides write, byte-identical to encode(record(...))


def line(**kw: Any) -> bytes:
    """One line from a fresh Lines, taking record()'s keywords."""
    lines = Lines(side=kw.pop("side"), pid=kw.pop("pid"), peer_uid=kw.pop("peer_uid", None),
                  peer_pid=kw.pop("peer_pid", None))  # fmt: skip
    return lines.line(kw.pop("now"), kw.pop("request_id"), kw.pop("request"),
                      kw.pop("decision"), **kw)  # fmt: skip


# Addresses where inet_ntop and ipaddress could disagree are drawn often: the
# ::/80 block (IPv4-compatible and -mapped forms) and runs of zero hextets.
_v6_tails = st.binary(min_size=6, max_size=6).map(lambda tail: bytes(10) + tail)
_v6_sparse = st.lists(st.sampled_from([0, 0, 0, 1, 0xFFFF, 0x1234]), min_size=8, max_size=8).map(
    lambda words: b"".join(w.to_bytes(2, "big") for w in words)
)
_scoped = st.builds(
    lambda v6, scope: ipaddress.IPv6Address(f"{v6}%{scope}"),
    st.ip_addresses(v=6),
    st.text(min_size=1).filter(lambda t: "%" not in t and "/" not in t),  # what it takes
)
addresses = st.one_of(
    st.ip_addresses(),
    st.one_of(_v6_tails, _v6_sparse).map(ipaddress.IPv6Address),
    st.just(ipaddress.IPv6Address("::ffff:0.0.0.0")),
    _scoped,  # refused by the boss and never decoded, but a line must still be JSON
)
requests = st.one_of(
    st.none(),
    st.builds(Ping, st.integers(0, 0xFFFFFFFF)),
    addresses.flatmap(
        lambda a: st.builds(
            Create,
            st.integers(0, 0xFFFFFFFF),
            st.sampled_from(Transport),
            st.just(a),
            st.integers(1, 0xFFFF),
            st.sampled_from([Option(v) for v in range(8) if a.version == 6 or not v & 4]),
        )
    ),
)
_maybe_int = st.none() | st.integers(0, 2**64)
_maybe_text = st.none() | st.text() | st.text(alphabet=st.characters(max_codepoint=0x7F))
_decisions = st.sampled_from(
    ["granted", "denied", "rate_limited", "malformed", "os_error", "pong"]
) | st.text()


# What changes from line to line of one writer, and what a writer fixes (Lines()).
_PER_LINE = dict(
    now=st.floats(min_value=0.0, max_value=4102444800.0),
    request_id=st.integers(0, 0xFFFFFFFF),
    request=requests,
    decision=_decisions,
    reason=_maybe_text,
    rule=_maybe_text,
    errno=_maybe_int,
    retry_ms=_maybe_int,
)
_PER_WRITER = dict(
    side=st.sampled_from(["helper", "boss"]) | st.text(),
    pid=st.integers(0, 2**32),
    peer_uid=_maybe_int,
    peer_pid=_maybe_int,
)


@given(**_PER_LINE, **_PER_WRITER)
def test_line_is_encode_of_record_byte_for_byte(**kw: Any) -> None:
    got = line(**kw)
    assert got == encode(record(**kw))
    assert got.isascii() and got.count(b"\n") == 1 and got.endswith(b"\n")
    rec = json.loads(got)
    assert tuple(rec) == FIELDS
    for key, field in (("side", "side"), ("pid", "pid"), ("request_id", "id"),
                       ("decision", "decision"), ("reason", "reason"), ("rule", "rule"),
                       ("errno", "errno"), ("retry_ms", "retry_ms"), ("peer_uid", "peer_uid"),
                       ("peer_pid", "peer_pid")):  # fmt: skip
        assert rec[field] == kw[key], field
    if isinstance(kw["request"], Create):
        assert ipaddress.ip_address(rec["address"]) == kw["request"].address


# A helper's session writes every line through one Lines: reused, each line
# must still be encode(record(...)) of its own arguments.
_ONE_WRITER = Lines(side="helper", pid=4321, peer_uid=2001, peer_pid=77)


@given(**_PER_LINE)
def test_one_writers_lines_are_line_each_time(**kw: Any) -> None:
    got = _ONE_WRITER.line(
        kw["now"], kw["request_id"], kw["request"], kw["decision"],
        kw["reason"], kw["rule"], kw["errno"], kw["retry_ms"],
    )  # fmt: skip
    assert got == encode(record(side="helper", pid=4321, peer_uid=2001, peer_pid=77, **kw))


@given(addresses)
def test_address_text_is_str(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert address_text(address) == str(address)


def test_address_text_keeps_a_scope() -> None:
    scoped = ipaddress.IPv6Address("fe80::1%eth0")
    assert address_text(scoped) == str(scoped) == "fe80::1%eth0"


@pytest.mark.parametrize(
    "char",
    [
        chr(c)
        for c in (
            *range(0x21),
            0x22,
            0x5C,
            0x7E,
            0x7F,
            0x80,
            0x2028,
            0xD800,
            0xFFFF,
            0x10000,
            0x10FFFF,
        )
    ],
)
def test_line_escapes_each_special_character_as_json_does(char: str) -> None:
    got = line(now=NOW, side="helper", pid=1, request_id=1, request=None, decision="malformed",
               reason=f"a{char}b")  # fmt: skip
    assert got == encode(record(now=NOW, side="helper", pid=1, request_id=1, request=None,
                                decision="malformed", reason=f"a{char}b"))  # fmt: skip
    assert json.loads(got)["reason"] == f"a{char}b"
