"""A policy in plain words, for ``privsock check-policy``. Boss side: the helper never runs this."""

from __future__ import annotations

import ipaddress
import os
import pwd

from privsock.helper.policy import (
    Decision,
    IPAddress,
    Peer,
    Policy,
    Rule,
    applies,
    decide,
)  # fmt: skip
from privsock.helper.policyparse import show_range
from privsock.helper.protocol import OPTION_NAMES, TRANSPORT_NAMES, Create, Option, Transport

WILDCARD_V4 = ipaddress.IPv4Address(0)
WILDCARD_V6 = ipaddress.IPv6Address(0)
ANY_V4 = ipaddress.IPv4Network("0.0.0.0/0")
ANY_V6 = ipaddress.IPv6Network("::/0")


def describe(policy: Policy) -> list[str]:
    """What the policy grants and denies, one human line each, for check-policy."""
    rate = policy.rate_limit.rate
    lines = [
        f"runs as user {policy.user}, group {policy.group}",
        f"rate limit: {int(rate) if rate.is_integer() else rate} CREATE requests per second "
        f"sustained, bursts of up to {policy.rate_limit.burst}",
    ]
    # "to everyone" is said only where some rule is limited to users or groups.
    scoped = any(r.users or r.groups for r in (*policy.allow, *policy.deny))
    for rule in policy.allow:
        options = ", ".join(n for n, o in OPTION_NAMES.items() if o in rule.options) or "none"
        wildcards = [w for w in (WILDCARD_V4, WILDCARD_V6) if any(w in n for n in rule.networks)]
        line = f"{rule.name}: allows {_scope(rule)}{for_whom(rule, scoped)}; options: {options}"
        if wildcards:
            line += "; includes wildcard binds to " + " and ".join(map(str, wildcards))
        if Transport.TCP in rule.transports and Option.REUSEADDR not in rule.options:
            # exec's default would be refused with reason "option": say so here first.
            # A rule that also grants udp cannot carry reuseaddr: tcp needs its own.
            fix = (
                'give tcp a rule of its own with options = ["reuseaddr"] (udp cannot have it)'
                if Transport.UDP in rule.transports
                else 'add options = ["reuseaddr"]'
            )
            line += (
                "; note: privsock exec asks for reuseaddr on TCP sockets, which this rule "
                f"refuses: {fix}, or run exec with --no-reuseaddr"
            )
        lines.append(line)
    for rule in policy.deny:
        line = f"{rule.name}: denies {_scope(rule)}{for_whom(rule, scoped)}, whatever the options"
        # Spell out what a deny rule means for wildcard binds where its networks do not
        # say it: any network of a family denies that family's wildcard, and an IPv4
        # one also denies dual-stack ::, which receives IPv4.
        v4 = [n for n in rule.networks if n.version == 4]
        v6 = [n for n in rule.networks if n.version == 6]
        implied: list[str] = []
        if v4 and not any(WILDCARD_V4 in n for n in v4):
            implied.append(str(WILDCARD_V4))
        if v6 and not any(WILDCARD_V6 in n for n in v6):
            implied.append(str(WILDCARD_V6))
        elif v4 and not v6:
            implied.append("dual-stack ::")
        if implied:
            line += "; this also denies wildcard binds to " + " and ".join(implied)
        lines.append(line)
    if policy.allow:
        lines.append("everything else is denied; deny rules win over allow rules")
    else:
        lines.append("grants nothing: there are no allow rules, so every request is denied")
    return lines


def warnings(policy: Policy) -> list[str]:
    """What the policy grants that is risky though valid, one line each."""
    return [
        f"{rule.name} grants reuseport on {_scope(rule)}: every socket the helper creates "
        f"belongs to user {policy.user}, so any boss of any helper running as {policy.user} "
        "that may bind the same address and port with reuseport joins the group and gets a "
        "share of its traffic; grant it only where a single boss uses this helper user"
        for rule in policy.allow
        if rule.options & Option.REUSEPORT
    ]


def _scope(rule: Rule) -> str:
    transports = "+".join(n for n, t in TRANSPORT_NAMES.items() if t in rule.transports)
    ports = ", ".join(show_range(r) for r in rule.ports)
    plural = "s" if len(rule.ports) > 1 or rule.ports[0][0] != rule.ports[0][1] else ""
    if ANY_V4 in rule.networks and ANY_V6 in rule.networks:
        where = "any address"
    else:
        where = ", ".join(map(str, rule.networks))
    return f"{transports} port{plural} {ports} on {where}"


def for_whom(rule: Rule, scoped: bool = True) -> str:
    """" to everyone" (or "" when not ``scoped``), or the users and groups a rule is
    limited to."""
    if not rule.users and not rule.groups:
        return " to everyone" if scoped else ""
    parts = []
    if rule.users:
        parts.append(("user " if len(rule.users) == 1 else "users ") + ", ".join(rule.users))
    if rule.groups:
        parts.append(("members of group " if len(rule.groups) == 1 else "members of groups ")
                     + ", ".join(rule.groups))  # fmt: skip
    return " only to " + " and ".join(parts)


def peer_of(user: str) -> Peer:
    """The peer a process of ``user`` would be (its primary and every listed group);
    KeyError if there is no such user."""
    entry = pwd.getpwnam(user)
    groups = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return Peer(uid=entry.pw_uid, gid=entry.pw_gid, pid=0, groups=groups)


def explain(policy: Policy, peer: Peer, user: str, transport: Transport, address: IPAddress,
            port: int, options: Option) -> tuple[Decision, list[str]]:  # fmt: skip
    """The verdict for one request from ``peer``, and the lines that explain it."""
    verdict = decide(policy, Create(0, transport, address, port, options), peer)
    host = f"[{address}]" if address.version == 6 else str(address)
    what = f"{transport.name.lower()}:{host}:{port}"
    groups = ", ".join(str(g) for g in sorted(peer.groups or ()))
    head = f"{what} for {user} (uid {peer.uid}, groups {groups or 'none'}): "
    lines = []
    if verdict.allowed:
        lines.append(head + f"GRANTED by {verdict.rule}")
    else:
        assert verdict.reason is not None
        by = verdict.rule
        if by == "default":
            by = f"default (no allow rule for {user} grants it)"
        lines.append(head + f"DENIED ({verdict.reason.name.lower()}) by {by}")
    for rule in (*policy.deny, *policy.allow):
        if rule.name == verdict.rule:
            kind = "allows" if rule.kind == "allow" else "denies"
            lines.append(f"  {rule.name}: {kind} {_scope(rule)}{for_whom(rule)}")
    skipped = [r.name for r in (*policy.allow, *policy.deny) if not applies(r, peer)]
    if skipped:
        lines.append(f"  not for {user}: {', '.join(skipped)}")
    return verdict, lines
