"""What the helper must answer, written again from the documents alone.

The fuzz targets and the live-helper fuzzer check the product against this
module, so it must not share code with it: it imports nothing from privsock and
follows privsock/helper/PROTOCOL.md (the wire rules), policy/README.md and the
privsock.helper.policy docstring (the decision), and the token-bucket definition (the
rate limit). Addresses are plain integers here, networks are (version, base,
prefix) triples, and every rule is spelled out by hand, so a mistake shared with
the product would have to be made twice in two different shapes.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Wire values (PROTOCOL.md tables).
CREATE, PING = 1, 2
UDP, TCP = 1, 2
REUSEADDR, REUSEPORT, V6ONLY = 1, 2, 4
OK, DENIED, RATE_LIMITED, MALFORMED, OS_ERROR = 0, 1, 2, 3, 4
STAGE_SOCKET, STAGE_SETSOCKOPT, STAGE_BIND, STAGE_SEND = 1, 2, 3, 4
# The errors of passing the fd itself, which end a grant as OS_ERROR at STAGE_SEND.
SEND_ERRNOS = frozenset({errno.ETOOMANYREFS, errno.EMFILE, errno.ENOBUFS, errno.ENOMEM})
REASON_PORT, REASON_ADDRESS, REASON_TRANSPORT, REASON_OPTION = 1, 2, 3, 4

_BITS = {4: 32, 6: 128}
_MAPPED_HIGH = 0xFFFF  # ::ffff:a.b.c.d has 0xffff in bits 32-47 and zeros above


@dataclass(frozen=True, slots=True)
class Request:
    """A request the model accepts. ``address`` is an integer of ``family`` bits."""

    op: int
    rid: int
    transport: int = 0
    family: int = 0
    port: int = 0
    address: int = 0
    options: int = 0


def request_id(data: bytes) -> int:
    """The id any reply must echo: bytes 4-7, or 0 for a message shorter than 8."""
    return int.from_bytes(data[4:8], "big") if len(data) >= 8 else 0


def parse_request(data: bytes) -> Request | None:
    """The request in ``data``, or None where the helper must answer MALFORMED."""
    if len(data) != 32 or data[0:2] != b"PS" or data[2] != 1:
        return None
    op, rid = data[3], int.from_bytes(data[4:8], "big")
    if op == PING:
        return Request(PING, rid) if data[8:] == bytes(24) else None
    if op != CREATE:
        return None
    transport, family = data[8], data[9]
    port = int.from_bytes(data[10:12], "big")
    raw = data[12:28]
    options = int.from_bytes(data[28:30], "big")
    if transport not in (UDP, TCP) or port == 0 or data[30:32] != b"\0\0":
        return None
    if options & ~(REUSEADDR | REUSEPORT | V6ONLY):
        return None
    if family == 4:
        if raw[4:] != bytes(12) or options & V6ONLY:
            return None
        address = int.from_bytes(raw[:4], "big")
    elif family == 6:
        address = int.from_bytes(raw, "big")
    else:
        return None
    return Request(CREATE, rid, transport, family, port, address, options)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    rid: int
    detail: int
    code: int


def parse_reply(data: bytes) -> Reply | None:
    """A reply as PROTOCOL.md allows it, or None."""
    if len(data) != 16 or data[0:2] != b"PS" or data[2] != 1 or data[13:16] != b"\0\0\0":
        return None
    status, code = data[3], data[12]
    rid, detail = int.from_bytes(data[4:8], "big"), int.from_bytes(data[8:12], "big")
    if status == OS_ERROR:
        valid = code in (STAGE_SOCKET, STAGE_SETSOCKOPT, STAGE_BIND, STAGE_SEND)
    elif status == DENIED:
        valid = code in (REASON_PORT, REASON_ADDRESS, REASON_TRANSPORT, REASON_OPTION)
        valid = valid and detail == 0
    elif status == RATE_LIMITED:
        valid = code == 0  # the helper never sends 0 ms, but the boss accepts it
    elif status in (OK, MALFORMED):
        valid = code == 0 and detail == 0
    else:
        valid = False
    return Reply(status, rid, detail, code) if valid else None


# ---------------------------------------------------------------------------
# Policy


@dataclass(frozen=True, slots=True)
class Net:
    version: int
    base: int
    prefix: int

    def __contains__(self, item: tuple[int, int]) -> bool:
        version, address = item
        if version != self.version:
            return False
        host_bits = _BITS[version] - self.prefix
        return address >> host_bits == self.base >> host_bits


def net(text: str) -> Net:
    """A network from "a.b.c.d/n" or "x:y::/n", parsed here by hand."""
    address, _, prefix = text.partition("/")
    version, value = parse_address(address)
    return Net(version, value, int(prefix) if prefix else _BITS[version])


def parse_address(text: str) -> tuple[int, int]:
    if ":" not in text:
        parts = [int(p) for p in text.split(".")]
        assert len(parts) == 4 and all(0 <= p <= 255 for p in parts), text
        return 4, int.from_bytes(bytes(parts), "big")
    head, _, tail = text.partition("::")
    left = [g for g in head.split(":") if g] if head else []
    right = [g for g in tail.split(":") if g] if tail else []
    groups: list[int] = []
    for part in (left, right):
        for g in part:
            if "." in g:  # a dotted IPv4 tail: two groups
                v4 = parse_address(g)[1]
                groups.extend([v4 >> 16, v4 & 0xFFFF])
            else:
                groups.append(int(g, 16))
    if "::" in text:
        n_left = sum(2 if "." in g else 1 for g in left)
        groups = groups[:n_left] + [0] * (8 - len(groups)) + groups[n_left:]
    assert len(groups) == 8, text
    value = 0
    for g in groups:
        value = value << 16 | g
    return 6, value


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    transports: frozenset[int]
    ports: tuple[tuple[int, int], ...]
    nets: tuple[Net, ...]
    options: int = 0

    def has_port(self, port: int) -> bool:
        return any(low <= port <= high for low, high in self.ports)


@dataclass(frozen=True, slots=True)
class Policy:
    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]
    rate: float = 20.0
    burst: int = 40


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: int  # 0 when allowed, else a wire reason
    rule: str


def judged(family: int, address: int, options: int) -> list[tuple[int, int]]:
    """The (version, address) pairs a request is judged as."""
    if family == 6 and address >> 32 == _MAPPED_HIGH:
        return [(4, address & 0xFFFFFFFF)]
    if family == 6 and address == 0 and not options & V6ONLY:
        return [(6, 0), (4, 0)]  # dual-stack ::: receives IPv4 as well
    return [(family, address)]


def decide(policy: Policy, transport: int, family: int, address: int, port: int,
           options: int) -> Verdict:  # fmt: skip
    targets = judged(family, address, options)
    for rule in policy.deny:
        if transport not in rule.transports or not rule.has_port(port):
            continue
        for version, value in targets:
            # A wildcard bind captures every address of its family, denied ones too.
            wildcard = value == 0 and any(n.version == version for n in rule.nets)
            if wildcard or any((version, value) in n for n in rule.nets):
                return Verdict(False, REASON_PORT, rule.name)
    granted: list[str] = []
    for version, value in targets:
        furthest = 0  # dimensions passed, in the order port, transport, address, options
        for rule in policy.allow:
            passed = 0
            if rule.has_port(port):
                passed = 1
                if transport in rule.transports:
                    passed = 2
                    if any((version, value) in n for n in rule.nets):
                        passed = 3
                        # policy/README.md: reuseaddr is never granted for udp.
                        never = REUSEADDR if transport == UDP else 0
                        if options & rule.options & ~never == options:
                            passed = 4
            if passed == 4:
                granted.append(rule.name)
                break
            furthest = max(furthest, passed)
        else:
            reason = (REASON_PORT, REASON_TRANSPORT, REASON_ADDRESS, REASON_OPTION)[furthest]
            return Verdict(False, reason, "default")
    return Verdict(True, 0, granted[0])


# ---------------------------------------------------------------------------
# The kernel, for the addresses the live fuzzer's policy allows


def bind_errno(family: int, address: int, options: int, local: Iterable[tuple[int, int]]) -> int:
    """What bind() returns in a network namespace whose only local addresses
    are ``local`` (plus the wildcards). Only covers unicast addresses."""
    if family == 6 and address >> 32 == _MAPPED_HIGH:
        if options & V6ONLY:
            return errno.EINVAL  # a v6-only socket cannot take an IPv4-mapped address
        family, address = 4, address & 0xFFFFFFFF
    if address == 0 or (family, address) in set(local):
        return 0
    if family == 4 and address >> 24 == 127:
        return 0  # all of 127.0.0.0/8 is local on lo
    return errno.EADDRNOTAVAIL


# ---------------------------------------------------------------------------
# The token bucket, counted against time


@dataclass(slots=True)
class BucketCheck:
    """Grants checked against the bucket: ``rate`` tokens/s, ``burst`` stored.

    Each token-taking request is (sent, received, granted), with times from the
    monotonic clock both processes share; the helper took its decision somewhere
    in [sent, received]. A refused request leaves fewer than one token, and the
    bucket never holds more than ``burst``. So for a refused request a and any
    later request z, the grants g after a up to z obey

        g < 1 + rate * (received_z - sent_a)                    (never too many)

    for any request a, the grants from a up to z obey g <= burst + rate *
    (received_z - sent_a) (idle time banks no more than a full bucket), and
    when z is refused as well and the bucket cannot have been full in between
    (a full bucket drops tokens),

        g > rate * (sent_z - received_a) - 1                   (never too few)

    that is: within one token of the theoretical bucket."""

    rate: float
    burst: int
    started: float  # before the helper started: the bucket is full from then on
    over: list[str] = field(default_factory=list)
    under: list[str] = field(default_factory=list)
    upper_checks: int = 0
    lower_checks: int = 0
    lower_span: float = 0.0  # the longest stretch the lower bound was checked over
    grants: int = 0
    refusals: int = 0

    def run(self, events: Sequence[tuple[float, float, bool]]) -> BucketCheck:
        rate = self.rate
        # Upper: min over anchors of (grants_a + slack_a - rate * sent_a); the start
        # is an anchor with a full bucket.
        base = self.started
        upper_anchor = float(self.burst)
        lower_anchor: float | None = None  # max of (grants_a - rate * received_a)
        lower_from = 0.0
        tokens_high = float(self.burst)  # the most tokens there can be after the last event
        previous_sent = base
        grants = 0
        for sent, received, granted in events:
            s, r = sent - base, received - base
            upper_anchor = min(upper_anchor, grants + self.burst - rate * s)  # full at most
            before = tokens_high + rate * (r - (previous_sent - base))
            if before >= self.burst:
                lower_anchor = None  # the bucket may have been full: tokens dropped
            if granted:
                grants += 1
                tokens_high = max(0.0, min(before, self.burst) - 1.0)
            else:
                tokens_high = min(before, 1.0)
            previous_sent = sent
            self.upper_checks += 1
            if grants - rate * r > upper_anchor + 1e-6:
                self.over.append(
                    f"{grants} grants by {r:.6f}s: more than the bucket allows "
                    f"(excess {grants - rate * r - upper_anchor:.3f} tokens)"
                )
            if granted:
                continue
            if lower_anchor is not None:
                self.lower_checks += 1
                self.lower_span = max(self.lower_span, s - lower_from)
                if grants - rate * s < lower_anchor - 1 - 1e-6:
                    self.under.append(
                        f"{grants} grants by {s:.6f}s: fewer than the bucket gives "
                        f"(short by {lower_anchor - 1 - (grants - rate * s):.3f} tokens)"
                    )
            upper_anchor = min(upper_anchor, grants + 1.0 - rate * s)
            candidate = grants - rate * r
            if lower_anchor is None:
                lower_anchor, lower_from = candidate, r
            elif candidate > lower_anchor:
                lower_anchor = candidate
        self.grants = grants
        self.refusals = sum(1 for e in events if not e[2])
        return self
