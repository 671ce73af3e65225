"""The helper's per-request code as it was before the in-process speed-ups: an oracle.

Verbatim copies of protocol.decode_request and policy.decide. (The previous
audit encoder, a dict through json.dumps, is privsock.auditjson, the boss's.)
The property tests hold the current code to give exactly what these give (the
same request or error, the same decision), and bench/steps.py times the two
side by side. Do not "improve" this module: its only job is to be what the
helper did before.
"""

from __future__ import annotations

import ipaddress
import struct

from privsock.helper.policy import GRANTABLE, Decision, Peer, Policy, Rule
from privsock.helper.protocol import (
    MAGIC,
    REQUEST_SIZE,
    VERSION,
    Create,
    Family,
    IPAddress,
    Op,
    Option,
    Ping,
    ProtocolError,
    Reason,
    Request,
    Transport,
    peek_request_id,
)  # fmt: skip

_REQUEST = struct.Struct(">2sBBIBBH16sHH")
_ZERO12 = bytes(12)
_TRANSPORTS = {int(t): t for t in Transport}
_ALL_OPTIONS = 7
_V6ONLY = 4
_OPTIONS = tuple(Option(value) for value in range(_ALL_OPTIONS + 1))
_ADDRESS_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)

WILDCARD_V4 = ipaddress.IPv4Address(0)
WILDCARD_V6 = ipaddress.IPv6Address(0)

# --- privsock/helper/protocol.py


def _check_create_fields(req: Create) -> None:
    # The types say so, but a caller's bug must fail here, not in struct.pack.
    if not isinstance(req.transport, Transport) or not isinstance(req.address, _ADDRESS_TYPES):
        raise ProtocolError("CREATE needs a transport and an address", req.request_id)
    if not 1 <= req.port <= 0xFFFF:
        raise ProtocolError(f"port {req.port} is outside 1-65535", req.request_id)
    # int(): on an IntFlag, ~ALL_OPTIONS keeps only known bits and would be 0;
    # plain ints are also several times faster than IntFlag arithmetic.
    options = int(req.options)
    if options & ~_ALL_OPTIONS:
        raise ProtocolError(f"unknown option bits {options:#x}", req.request_id)
    if options & _V6ONLY and req.address.version == 4:
        raise ProtocolError("V6ONLY is only valid for IPv6", req.request_id)


def decode_request(data: bytes) -> Request:
    """Parse one request, or raise ProtocolError naming the first rule it breaks."""
    rid = peek_request_id(data)
    if len(data) != REQUEST_SIZE:
        raise ProtocolError(f"request is {len(data)} bytes, not {REQUEST_SIZE}", rid)
    magic, version, op, rid, transport, family, port, raw, options, reserved = _REQUEST.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}", rid)
    if version != VERSION:
        raise ProtocolError(f"unsupported version {version}", rid)
    if op == Op.PING:
        if any(data[8:]):
            raise ProtocolError("PING must have bytes 8-31 zero", rid)
        return Ping(rid)
    if op != Op.CREATE:
        raise ProtocolError(f"unknown op {op}", rid)
    if reserved:
        raise ProtocolError("reserved bytes 30-31 are not zero", rid)
    kind = _TRANSPORTS.get(transport)
    if kind is None:
        raise ProtocolError(f"unknown transport {transport}", rid)
    if family == Family.IPV4:
        if raw[4:] != _ZERO12:
            raise ProtocolError("IPv4 address padding (bytes 16-27) is not zero", rid)
        address: IPAddress = ipaddress.IPv4Address(raw[:4])
    elif family == Family.IPV6:
        address = ipaddress.IPv6Address(raw)
    else:
        raise ProtocolError(f"unknown family {family}", rid)
    flags = _OPTIONS[options] if options < len(_OPTIONS) else Option(options)
    req = Create(rid, kind, address, port, flags)
    _check_create_fields(req)
    return req


# --- privsock/helper/policy.py

# How far a request got into an allow rule; a later entry got further.
_PROGRESS = (Reason.PORT, Reason.TRANSPORT, Reason.ADDRESS, Reason.OPTION)


def decide(policy: Policy, create: Create, peer: Peer | None = None) -> Decision:
    """Judge one CREATE request from ``peer``; the rules are in the module docstring."""
    transport, port, options = create.transport, create.port, create.options
    address = create.address
    judged = _judged_as(address, options)
    for rule in policy.deny:
        # A deny rule that may be for this peer counts (fail closed).
        if applies(rule, peer) is False:
            continue
        if any(_deny_matches(rule, transport, a, port) for a in judged):
            return Decision(False, Reason.PORT, rule.name)
    granted: list[Rule] = []
    for a in judged:
        furthest = Reason.PORT
        for rule in policy.allow:
            if not applies(rule, peer):
                continue
            miss = _allow_miss(rule, transport, a, port, options)
            if miss is None:
                granted.append(rule)
                break
            furthest = max(furthest, miss, key=_PROGRESS.index)
        else:
            return Decision(False, furthest, "default")
    return Decision(True, None, granted[0].name)


def applies(rule: Rule, peer: Peer | None) -> bool | None:
    """Whether ``rule`` is for ``peer``: True, False, or None when it cannot be
    told (an unknown peer or unresolved names; the caller fails closed)."""
    if not rule.users and not rule.groups:
        return True
    if peer is None:
        return None
    if rule.users and (rule.uids is None or peer.uid in rule.uids):
        return None if rule.uids is None else True
    if rule.groups:
        if rule.gids is None:
            return None
        if peer.gid in rule.gids or (peer.groups is not None and peer.groups & rule.gids):
            return True
        if peer.groups is None:
            return None
    return False


def _judged_as(address: IPAddress, options: Option) -> tuple[IPAddress, ...]:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return (address.ipv4_mapped,)
        if address == WILDCARD_V6 and not options & Option.V6ONLY:
            return (WILDCARD_V6, WILDCARD_V4)
    return (address,)


def _has_port(rule: Rule, port: int) -> bool:
    return any(low <= port <= high for low, high in rule.ports)


def _deny_matches(rule: Rule, transport: Transport, address: IPAddress, port: int) -> bool:
    if transport not in rule.transports or not _has_port(rule, port):
        return False
    if address.is_unspecified:
        return any(n.version == address.version for n in rule.networks)
    return any(address in n for n in rule.networks)


def _allow_miss(
    rule: Rule, transport: Transport, address: IPAddress, port: int, options: Option
) -> Reason | None:
    """The first dimension in which ``rule`` does not allow the request, or None."""
    if not _has_port(rule, port):
        return Reason.PORT
    if transport not in rule.transports:
        return Reason.TRANSPORT
    if not any(address in n for n in rule.networks):
        return Reason.ADDRESS
    if options & ~(rule.options & GRANTABLE[transport]):
        return Reason.OPTION
    return None
