"""The policy model and the decision: pure, no I/O. The helper runs ``decide`` under seccomp.

policyparse.py builds these types from the policy file (as root, before the drop);
policy/README.md describes the file for operators.

Decisions (``decide``), in this order:

1. Normalise the address. An IPv4-mapped IPv6 address ``::ffff:a.b.c.d`` is judged
   as the IPv4 address ``a.b.c.d``, as the kernel binds it. The IPv6 wildcard ``::``
   without V6ONLY is dual-stack and receives IPv4 on every address too, so it is
   judged as both ``::`` and ``0.0.0.0``; each must pass. (The check assumes
   dual-stack even where the bindv6only sysctl says otherwise: stricter, never looser.)
2. Deny rules win. A deny rule matches a judged address when the transport is in
   its transports, the port in one of its ranges, and the address in one of its
   networks, or when the address is the wildcard of its family (0.0.0.0 or ::) and
   the rule has any network of that family: a wildcard bind captures the traffic of
   every address, the denied ones included. Options do not matter. A hit is DENIED
   with Reason.PORT and names the deny rule.
3. Otherwise every judged address needs an allow rule whose transports, ports and
   networks contain it and whose options include every requested option, counting
   only the options GRANTABLE for the transport: UDP reuseaddr is never granted,
   whatever a rule says (the parser refuses such a rule too). A wildcard
   is only allowed by a rule with a network containing the wildcard address itself
   (0.0.0.0/0, ::/0, 0.0.0.0/32, ...). The decision names the allow rule that allowed
   the requested address itself (for dual-stack ``::``, the rule for ``::``).
4. Otherwise default deny. The reason is that of the allow rule that got furthest
   when its dimensions are checked in the order port, transport, address, options:
   PORT (no rule has the port; also when there are no allow rules), TRANSPORT,
   ADDRESS or OPTION. The decision names "default".

Who asks (the ``peer``: the process on the other end of fd 0, from SO_PEERCRED and
SO_PEERGROUPS) decides which rules apply at all, before any of the above. A rule with
neither ``users`` nor ``groups`` applies to everyone. A rule with either applies when
the peer's uid is one of its users or one of the peer's groups (primary or
supplementary) is one of its groups; a rule that does not apply is skipped as if it
were not in the file. Fail closed where the peer is not known: with no peer, or with
names that were never resolved to ids, such an allow rule never applies and such a
deny rule always does; when only the supplementary groups are unknown, an allow rule
sees the primary group alone and a deny rule with groups applies.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
from collections.abc import Iterator
from typing import Literal, NamedTuple

from privsock.helper.protocol import Create, Option, Reason, Transport

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The options a rule can grant, per transport. On UDP, SO_REUSEADDR has no owner
# check: a second socket with it may bind a port that another user's service holds
# with SO_REUSEADDR (dnsmasq, systemd-resolved's stub), and the newest socket gets
# the unicast traffic. A grant of it would let a boss take over that service's port.
# On TCP it never lets a bind share a port with a listening socket, so TCP keeps it.
GRANTABLE: dict[Transport, Option] = {
    Transport.UDP: Option.REUSEPORT | Option.V6ONLY,
    Transport.TCP: Option.REUSEADDR | Option.REUSEPORT | Option.V6ONLY,
}


class RateLimit(NamedTuple):
    rate: float  # tokens per second
    burst: int


class Rule(NamedTuple):
    # Its index in the file's [[allow]] or [[deny]] list (named otherwise: a
    # NamedTuple field called index would hide tuple.index).
    position: int
    kind: Literal["allow", "deny"]
    transports: frozenset[Transport]
    ports: tuple[tuple[int, int], ...]  # inclusive ranges, in file order
    networks: tuple[IPNetwork, ...]
    options: Option  # what an allow rule permits; Option(0) for deny rules
    users: tuple[str, ...] = ()  # names from the file; () with groups () = everyone
    groups: tuple[str, ...] = ()
    # The names resolved to ids (privsock.helper.peernames, at start, before the
    # drop); None until then, and a rule with names but no ids fails closed.
    uids: frozenset[int] | None = None
    gids: frozenset[int] | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}[{self.position}]"


class Connections(NamedTuple):
    """[connections]: a shared helper's bound on helpers per peer uid (slots.py)."""

    per_user: int
    lock_dir: str


class Peer(NamedTuple):
    """The process on the other end of the channel, as the kernel saw it when it
    connected (or created the socketpair)."""

    uid: int
    gid: int
    pid: int
    groups: frozenset[int] | None  # supplementary groups; None if the kernel's list did not fit


class Policy(NamedTuple):
    user: str
    group: str
    rate_limit: RateLimit
    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]
    # Refuse to start where the kernel cannot apply the Landlock ruleset
    # (landlock.py); SECURITY.md says why this is the default.
    require_landlock: bool = True
    connections: Connections | None = None  # None: no bound per user


class Decision(NamedTuple):
    allowed: bool
    reason: Reason | None  # None when allowed
    rule: str  # "allow[0]", "deny[1]" or "default"


# ---------------------------------------------------------------------------
# Deciding

# How far a request got into an allow rule, as an index: a later entry got further.
_PROGRESS = (Reason.PORT, Reason.TRANSPORT, Reason.ADDRESS, Reason.OPTION)
_TRANSPORT, _ADDRESS, _OPTION = 1, 2, 3
_V6ONLY = int(Option.V6ONLY)


class Compiled(NamedTuple):
    """A rule as ``judge`` reads it: plain integers, precomputed once per peer."""

    name: str
    transports: frozenset[int]
    networks: dict[int, tuple[tuple[int, int], ...]]  # IP version -> (base, mask)
    grants: dict[int, int]  # transport -> the option bits an allow rule grants on it


class Rules(NamedTuple):
    """The rules that apply to one peer, cut by port: ``starts`` is sorted, and the
    ports from starts[i] up to the next start are in exactly the deny and allow
    rules of ``rules[i]`` (each in file order)."""

    starts: tuple[int, ...]
    rules: tuple[tuple[tuple[Compiled, ...], tuple[Compiled, ...]], ...]


def rules_for(policy: Policy, peer: Peer | None) -> Rules:
    """What ``judge`` needs of ``policy`` for requests from ``peer``. An allow rule
    counts only when it is for the peer; a deny rule unless it is surely not (fail
    closed, see applies)."""
    allow = [r for r in policy.allow if applies(r, peer)]
    deny = [r for r in policy.deny if applies(r, peer) is not False]
    ends = (p for r in (*allow, *deny) for low, high in r.ports for p in (low, high + 1))
    starts = tuple(sorted({0, *ends}))
    allow_compiled = [(r, _compile(r)) for r in allow]
    deny_compiled = [(r, _compile(r)) for r in deny]
    pieces = tuple(
        (tuple(j for r, j in deny_compiled if _has_port(r, start)),
         tuple(j for r, j in allow_compiled if _has_port(r, start)))
        for start in starts
    )  # fmt: skip
    return Rules(starts, pieces)


def _compile(rule: Rule) -> Compiled:
    networks: dict[int, tuple[tuple[int, int], ...]] = {
        v: tuple((int(n.network_address), int(n.netmask)) for n in rule.networks if n.version == v)
        for v in (4, 6)
    }
    grants = {int(t): int(rule.options & GRANTABLE[t]) for t in Transport}
    return Compiled(rule.name, frozenset(map(int, rule.transports)), networks, grants)


def decide(policy: Policy, create: Create, peer: Peer | None = None) -> Decision:
    """Judge one CREATE request from ``peer``; the rules are in the module docstring."""
    return judge(rules_for(policy, peer), create)


def judge(rules: Rules, create: Create) -> Decision:
    """decide() on rules precomputed by rules_for (the helper builds them once per
    session)."""
    transport, port, options = int(create.transport), create.port, int(create.options)
    judged = _judged_as(create.address, options)
    denies, allows = rules.rules[bisect.bisect_right(rules.starts, port) - 1]
    for rule in denies:
        if transport in rule.transports and any(_denies(rule, v, a) for v, a in judged):
            return Decision(False, Reason.PORT, rule.name)
    granted = ""
    for version, address in judged:
        furthest = 0  # Reason.PORT: no rule has the port
        for rule in allows:
            miss = _allow_miss(rule, transport, version, address, options)
            if miss is None:
                granted = granted or rule.name  # the rule for the requested address
                break
            furthest = max(furthest, miss)
        else:
            return Decision(False, _PROGRESS[furthest], "default")
    return Decision(True, None, granted)


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


def _judged_as(address: IPAddress, options: int) -> tuple[tuple[int, int], ...]:
    """The (IP version, address) pairs a bind of ``address`` is judged as."""
    value = int(address)
    if address.version == 6:
        if value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d
            return ((4, value & 0xFFFFFFFF),)
        if not value and not options & _V6ONLY:  # dual-stack ::
            return ((6, 0), (4, 0))
    return ((address.version, value),)


def _has_port(rule: Rule, port: int) -> bool:
    return any(low <= port <= high for low, high in rule.ports)


def _allow_miss(
    rule: Compiled, transport: int, version: int, address: int, options: int
) -> int | None:
    """The first dimension (after the port) in which ``rule`` does not allow the
    request, as a _PROGRESS index, or None."""
    if transport not in rule.transports:
        return _TRANSPORT
    if not any(address & mask == base for base, mask in rule.networks[version]):
        return _ADDRESS
    if options & ~rule.grants[transport]:
        return _OPTION
    return None


def _denies(rule: Compiled, version: int, address: int) -> bool:
    networks = rule.networks[version]
    if not address:  # the wildcard captures every address of its family
        return bool(networks)
    return any(address & mask == base for base, mask in networks)


# ---------------------------------------------------------------------------
# Coverage: what deny rules leave of an allow rule (the parser's "can never
# match" check, and the TCP ports the kernel's Landlock ruleset lets through).


def port_pieces(
    low: int, high: int, denies: list[Rule]
) -> Iterator[tuple[int, int, list[Rule]]]:
    """Cut the ports [low, high] at every boundary of the ``denies``' ranges. Yields
    (start, stop, over): each port in [start, stop) is in the range of exactly the
    deny rules ``over``."""
    cuts = {low, high + 1}
    cuts.update(b for d in denies for lo, hi in d.ports for b in (lo, hi + 1) if low < b <= high)
    for start, stop in itertools.pairwise(sorted(cuts)):
        over = [d for d in denies if any(lo <= start and stop - 1 <= hi for lo, hi in d.ports)]
        yield start, stop, over


def _only_wildcard(network: IPNetwork) -> bool:
    return network.prefixlen == network.max_prefixlen and network.network_address.is_unspecified


def denies_some(deny: Rule, network: IPNetwork) -> bool:
    """Whether ``deny`` refuses at least one address of ``network``."""
    if _only_wildcard(network):
        return any(n.version == network.version for n in deny.networks)
    return any(n.overlaps(network) for n in deny.networks)


def covered(network: IPNetwork, by: list[IPNetwork]) -> bool:
    """Whether deny networks ``by`` refuse every address of ``network``, as decide
    judges them (a denied network of its family denies the wildcard)."""
    if _only_wildcard(network):
        return any(n.version == network.version for n in by)
    # collapse_addresses merges adjacent blocks, so a block inside the union of
    # ``by`` is inside one collapsed block.
    if isinstance(network, ipaddress.IPv4Network):
        v4 = [n for n in by if isinstance(n, ipaddress.IPv4Network)]
        return any(network.subnet_of(c) for c in ipaddress.collapse_addresses(v4))
    v6 = [n for n in by if isinstance(n, ipaddress.IPv6Network)]
    return any(network.subnet_of(c) for c in ipaddress.collapse_addresses(v6))


def tcp_bind_ports(policy: Policy) -> tuple[int, ...]:
    """Every TCP port ``decide`` can grant, sorted: the ports of the TCP allow rules,
    less those that TCP deny rules refuse on every address the allow rule has.
    Landlock rules carry ports, not addresses, so a port granted on one address
    and denied on another stays in. Never smaller than what decide grants (a
    property test holds it to that): the kernel would refuse a granted bind."""
    denies = [d for d in policy.deny if Transport.TCP in d.transports]
    ports: set[int] = set()
    for rule in policy.allow:
        if Transport.TCP not in rule.transports:
            continue
        for low, high in rule.ports:
            for start, stop, over in port_pieces(low, high, denies):
                refused = [n for d in over for n in d.networks]
                if not all(covered(n, refused) for n in rule.networks):
                    ports.update(range(start, stop))
    return tuple(sorted(ports))
