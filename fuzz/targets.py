"""The fuzz targets: each takes bytes and raises only when the product is wrong.

* ``protocol``: the request and reply decoders against fuzz/model.py, plus
  canonical round trips; the only exception allowed is ProtocolError.
* ``policy_parser``: parse_policy on arbitrary text raises only a one-line
  PolicyError, and what it accepts keeps every documented rule.
* ``policy_decide``: decide() on policies and requests built from the bytes,
  against the independent model; the same policy rendered as TOML and parsed
  must decide the same way.

Plain functions of bytes, with no atheris import, so tests replay the corpus
and regression inputs without a fuzzing engine (fuzz/run.py adds one).
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
import tomllib
from collections.abc import Callable

from fuzz import model
from privsock.helper import protocol
from privsock.helper.policy import Decision, Policy, RateLimit, Rule, decide
from privsock.helper.policyparse import PolicyError, parse_policy
from privsock.helper.protocol import Option, ProtocolError, Reason, Transport
from privsock.policyview import describe

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class Bytes:
    """Reads fields off the fuzzer's bytes; past the end everything is zero, so
    every input, however short, describes something."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk.ljust(n, b"\0")

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")


# ---------------------------------------------------------------------------
# protocol


def protocol_target(data: bytes) -> None:
    want = model.parse_request(data)
    try:
        req = protocol.decode_request(data)
    except ProtocolError as exc:
        assert want is None, f"decode_request refused what the protocol allows: {exc}"
        assert exc.request_id == model.request_id(data), "a refusal must echo bytes 4-7"
        assert str(exc).isprintable(), repr(str(exc))
    else:
        assert want is not None, f"decode_request accepted a malformed request: {req}"
        if isinstance(req, protocol.Ping):
            got = model.Request(model.PING, req.request_id)
        else:
            got = model.Request(
                model.CREATE, req.request_id, int(req.transport), int(req.family), req.port,
                int(req.address), int(req.options),
            )  # fmt: skip
        assert got == want, f"decoded {got}, the protocol says {want}"
        assert protocol.encode_request(req) == data, "a request has exactly one encoding"
    reply_want = model.parse_reply(data)
    try:
        reply = protocol.decode_reply(data)
    except ProtocolError as exc:
        assert reply_want is None, f"decode_reply refused what the protocol allows: {exc}"
        assert str(exc).isprintable(), repr(str(exc))
    else:
        assert reply_want is not None, f"decode_reply accepted a malformed reply: {reply}"
        got_reply = model.Reply(int(reply.status), reply.request_id, reply.detail, reply.code)
        assert got_reply == reply_want, f"decoded {got_reply}, the protocol says {reply_want}"
        assert protocol.encode_reply(reply) == data, "a reply has exactly one encoding"


# ---------------------------------------------------------------------------
# policy_parser


def policy_parser_target(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        tomllib.loads(text)
        toml_ok = True
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):
        toml_ok = False
    try:
        policy = parse_policy(text, "fuzz.toml")
    except PolicyError as exc:
        message = str(exc)
        assert message.startswith("fuzz.toml: "), message
        assert message.isprintable(), repr(message)
        assert toml_ok or "invalid TOML" in message, message
        return
    assert toml_ok, "parse_policy accepted text that is not TOML"
    check_accepted(policy)


def check_accepted(policy: Policy) -> None:
    """Every rule the parser promises about a policy it accepts."""
    rate, burst = policy.rate_limit.rate, policy.rate_limit.burst
    assert math.isfinite(rate) and 0 < rate <= 100_000, rate
    assert type(burst) is int and 1 <= burst <= 100_000, burst
    for name in (policy.user, policy.group):
        assert _NAME.match(name) and name != "root", name
    assert policy.allow or policy.deny
    for rules, kind in ((policy.allow, "allow"), (policy.deny, "deny")):
        for index, rule in enumerate(rules):
            assert (rule.kind, rule.position) == (kind, index)
            assert rule.transports and rule.transports <= set(Transport)
            assert rule.ports
            ordered = sorted(rule.ports)
            for low, high in ordered:
                assert 1 <= low <= high <= 65535, rule.ports
            for (_, high), (low, _) in itertools.pairwise(ordered):
                assert high < low, f"overlapping ports {rule.ports}"
            assert rule.networks and len(set(rule.networks)) == len(rule.networks)
            for network in rule.networks:
                assert network == ipaddress.ip_network(str(network), strict=True)
                assert not (network.version == 6 and network.subnet_of(_MAPPED)), network
            if kind == "deny":
                assert rule.options == Option(0)
            elif rule.options & Option.V6ONLY:
                assert any(n.version == 6 for n in rule.networks)
    for line in describe(policy):
        assert line.isprintable(), repr(line)
    # Each allow rule's own first point, decided by the product and by the model.
    mine = to_model(policy)
    for rule in policy.allow:
        transport = min(rule.transports)
        address = rule.networks[0].network_address
        port = rule.ports[0][0]
        compare(policy, mine, transport, address, port, rule.options)


# ---------------------------------------------------------------------------
# policy_decide

_PORTS = (1, 22, 53, 80, 443, 1023, 1024, 8080, 65535)


def _network(b: Bytes) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    head = b.u8()
    version = 6 if head & 0x80 else 4
    bits = 128 if version == 6 else 32
    prefix = (head & 0x7F) % (bits + 1)
    raw = int.from_bytes(b.take(bits // 8), "big")
    base = raw & ~((1 << (bits - prefix)) - 1) if prefix else 0
    if version == 4:
        return ipaddress.IPv4Network((base, prefix))
    return ipaddress.IPv6Network((base, prefix))


def _rule(b: Bytes, kind: str, index: int) -> Rule:
    mask = b.u8() % 3 + 1
    transports = frozenset(t for t in Transport if mask & t)
    ports = []
    for _ in range(b.u8() % 3 + 1):
        low = max(1, b.u16())
        ports.append((low, min(65535, low + b.u16() % 1024)))
    networks = tuple(dict.fromkeys(_network(b) for _ in range(b.u8() % 3 + 1)))
    options = Option(b.u8() & 7) if kind == "allow" else Option(0)
    return Rule(index, kind, transports, tuple(ports), networks, options)  # type: ignore[arg-type]


def _address(b: Bytes, policy: Policy) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    how = b.u8()
    networks = [n for r in (*policy.allow, *policy.deny) for n in r.networks]
    if how & 0x80 and networks:
        # Near a network of the policy: its first, second or last address.
        network = networks[how % len(networks)]
        first, last = network.network_address, network.broadcast_address
        address = (first, first + 1 if first != last else first, last)[(how >> 4) % 3]
        if how & 0x40 and address.version == 4:
            return ipaddress.IPv6Address(0xFFFF << 32 | int(address))  # IPv4-mapped
        return address
    if how & 1:
        return ipaddress.IPv6Address(b.take(16))
    return ipaddress.IPv4Address(b.take(4))


def decide_target(data: bytes) -> None:
    b = Bytes(data)
    n_allow, n_deny = b.u8() % 5, b.u8() % 4
    allow = tuple(_rule(b, "allow", i) for i in range(n_allow))
    deny = tuple(_rule(b, "deny", i) for i in range(n_deny))
    policy = Policy("privsock", "privsock", RateLimit(1.0, 1), allow, deny)
    transport = Transport(b.u8() % 2 + 1)
    address = _address(b, policy)
    how = b.u8()
    rules = (*allow, *deny)
    if how & 0x80 and rules:
        rule = rules[how % len(rules)]
        low, high = rule.ports[(how >> 2) % len(rule.ports)]
        port = max(1, min(65535, (low, high, low - 1, high + 1)[how & 3]))
    else:
        port = max(1, b.u16())
    options = Option(b.u8() & 7)
    if address.version == 4:
        options &= ~Option.V6ONLY
    mine = to_model(policy)
    compare(policy, mine, transport, address, port, options)
    # The same policy written out and parsed back must decide alike, when the
    # parser accepts it (it refuses overlaps and rules that can never match).
    try:
        parsed = parse_policy(render(policy), "decide.toml")
    except PolicyError:
        return
    check_accepted(parsed)
    compare(parsed, mine, transport, address, port, options)


def to_model(policy: Policy) -> model.Policy:
    def rule(r: Rule) -> model.Rule:
        nets = tuple(model.net(str(n)) for n in r.networks)
        return model.Rule(r.name, frozenset(map(int, r.transports)), r.ports, nets, int(r.options))

    return model.Policy(tuple(map(rule, policy.allow)), tuple(map(rule, policy.deny)))


def compare(
    policy: Policy,
    mine: model.Policy,
    transport: Transport,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    options: Option,
) -> None:
    got = decide(policy, protocol.Create(1, transport, address, port, options))
    want = model.decide(mine, int(transport), address.version, int(address), port, int(options))
    expected = Decision(want.allowed, Reason(want.reason) if want.reason else None, want.rule)
    assert got == expected, (
        f"decide({transport.name}, {address}, {port}, {options!r}) = {got}, "
        f"the documented rules give {expected}"
    )


def render(policy: Policy) -> str:
    """``policy`` as a TOML file."""
    names = {Transport.UDP: '"udp"', Transport.TCP: '"tcp"'}
    option_names = {Option.REUSEADDR: '"reuseaddr"', Option.REUSEPORT: '"reuseport"',
                    Option.V6ONLY: '"v6only"'}  # fmt: skip
    lines = ["version = 1"]
    for rule in (*policy.allow, *policy.deny):
        ports = ", ".join(str(lo) if lo == hi else f'"{lo}-{hi}"' for lo, hi in rule.ports)
        networks = ", ".join(f'"{n}"' for n in rule.networks)
        lines += [
            f"[[{rule.kind}]]",
            f"transports = [{', '.join(names[t] for t in sorted(rule.transports))}]",
            f"ports = [{ports}]",
            f"addresses = [{networks}]",
        ]
        if rule.kind == "allow":
            chosen = [v for k, v in option_names.items() if rule.options & k]
            lines.append(f"options = [{', '.join(chosen)}]")
    return "\n".join(lines) + "\n"


TARGETS: dict[str, Callable[[bytes], None]] = {
    "protocol": protocol_target,
    "policy_parser": policy_parser_target,
    "policy_decide": decide_target,
}
