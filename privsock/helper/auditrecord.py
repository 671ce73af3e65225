"""The audit log format: one JSON object per line, the same on both sides.

Fields (always present, in this order; absent values are null):
  time      UTC, RFC 3339 with microseconds, e.g. "2026-11-26T20:01:02.123456Z"
  side      "helper" or "boss"
  pid       the process that wrote the line
  id        request id (0 when a malformed request was shorter than 8 bytes)
  op        "CREATE", "PING" or null (malformed)
  transport "udp" / "tcp" / null
  address   the requested address as text, or null
  port      integer or null
  options   list of option names ("reuseaddr", "reuseport", "v6only")
  decision  "granted", "denied", "rate_limited", "malformed", "os_error", "pong"
  reason    denied: "port", "address", "transport", "option"; malformed: the rule
            broken; os_error: the stage ("socket", "setsockopt", "bind", or "send":
            the granted socket could not be passed, the request's fields are kept)
  rule      the policy rule that decided ("allow[0]", "deny[1]", "default")
  errno     os_error: the errno number; rate_limited: null
  retry_ms  rate_limited: milliseconds until a retry can succeed
  peer_uid  helper: the uid of the process on the other end of the channel
            (SO_PEERCRED: the boss that connected, or that made the socketpair)
  peer_pid  helper: that process's pid when it connected; boss lines: null
  user      boss lines of `privsock exec`: the user the command will run as
  command   boss lines of `privsock exec`: the command's argv, argv[0] the path found

Pure: building a line does no I/O and opens no file (the helper formats lines
under seccomp). The time is passed in. Both sides write ``Lines.line``: the fields in
their fixed order through one template, no dict and no json.dumps; a property
test holds it byte-identical to json.dumps of the same record as a dict, the
form the boss builds and parses.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import time

from privsock.helper import jsontext
from privsock.helper.protocol import OPTION_NAMES, Create, Option, Ping, Request

FIELDS = (
    "time", "side", "pid", "id", "op", "transport", "address", "port", "options",
    "decision", "reason", "rule", "errno", "retry_ms", "peer_uid", "peer_pid",
    "user", "command",
)  # fmt: skip


def option_names(options: Option) -> list[str]:
    return [name for name, flag in OPTION_NAMES.items() if options & flag]


@functools.lru_cache(maxsize=1)
def _second(seconds: float) -> str:
    # Lines come many to a second: format the date and time once per second.
    t = time.gmtime(seconds)
    return (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    )


def rfc3339(now: float) -> str:
    # Round to the nearest microsecond (as datetime does): truncating the float would
    # print 1.000001 as 1.000000. Rounding up may carry into the next second.
    seconds, fraction = divmod(now, 1.0)
    micros = round(fraction * 1_000_000)
    if micros == 1_000_000:
        seconds, micros = seconds + 1, 0
    return f"{_second(seconds)}.{micros:06d}Z"


def _string(text: str | None) -> str:
    # A malformed request's reason quotes the bytes a hostile boss sent, so
    # every string goes through the escaper.
    return "null" if text is None else jsontext.string(text)


def _number(value: int | None) -> str:
    return "null" if value is None else str(int(value))


def address_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """str(address), about ten times faster for IPv6. inet_ntop writes what
    ipaddress does (RFC 5952), except where glibc embeds an IPv4 address
    (::ffff:1.2.3.4, ::1.2.3.4) and for a scope (fe80::1%eth0): str() takes those."""
    packed = address.packed
    if len(packed) == 4:
        return socket.inet_ntop(socket.AF_INET, packed)
    assert isinstance(address, ipaddress.IPv6Address)
    if (packed[:10] == _ZERO10 and packed[10:14] != _ZERO4) or address.scope_id is not None:
        return str(address)
    return socket.inet_ntop(socket.AF_INET6, packed)


_ZERO10, _ZERO4 = bytes(10), bytes(4)
_OPTION_LISTS = tuple(
    "[" + ",".join(f'"{name}"' for name in option_names(Option(v))) + "]" for v in range(8)
)
_TRANSPORT_TEXT = {1: '"udp"', 2: '"tcp"'}


# The decisions (FIELDS above), quoted once.
_DECISIONS = {
    d: jsontext.string(d)
    for d in ("granted", "denied", "rate_limited", "malformed", "os_error", "pong")
}


class Lines:
    """The lines of one writer. What never changes for it (side, pid, its peer)
    is formatted once; ``line`` formats the rest, field by field in FIELDS' order."""

    __slots__ = ("_head", "_tail")

    def __init__(
        self, *, side: str, pid: int, peer_uid: int | None = None, peer_pid: int | None = None
    ) -> None:
        self._head = f',"side":{_string(side)},"pid":{_number(pid)},"id":'
        self._tail = (
            f',"peer_uid":{_number(peer_uid)},"peer_pid":{_number(peer_pid)},'
            '"user":null,"command":null}\n'
        )

    def line(
        self,
        now: float,
        request_id: int,
        request: Request | None,
        decision: str,
        reason: str | None = None,
        rule: str | None = None,
        errno: int | None = None,
        retry_ms: int | None = None,
    ) -> bytes:
        if isinstance(request, Create):
            op, transport = '"CREATE"', _TRANSPORT_TEXT[request.transport]
            text = address_text(request.address)
            # Hex digits, '.' and ':' need no escaping; a scope (fe80::1%eth0) may hold anything.
            address = _string(text) if "%" in text else f'"{text}"'
            port = str(int(request.port))
            options = _OPTION_LISTS[request.options]
        else:
            op = '"PING"' if isinstance(request, Ping) else "null"
            transport = address = port = "null"
            options = "[]"
        return (
            f'{{"time":"{rfc3339(now)}"{self._head}{_number(request_id)},"op":{op},'
            f'"transport":{transport},"address":{address},"port":{port},"options":{options},'
            f'"decision":{_DECISIONS.get(decision) or _string(decision)},'
            f'"reason":{_string(reason)},"rule":{_string(rule)},"errno":{_number(errno)},'
            f'"retry_ms":{_number(retry_ms)}{self._tail}'
        ).encode("ascii")

