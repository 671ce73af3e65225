"""A policy in plain words, for ``privsock check-policy``. Boss side: the helper never runs this."""

from __future__ import annotations

import ipaddress

from privsock.helper.policy import WILDCARD_V4, WILDCARD_V6, Policy, Rule
from privsock.helper.policyparse import show_range
from privsock.helper.protocol import OPTION_NAMES, TRANSPORT_NAMES, Option, Transport

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
    for rule in policy.allow:
        options = ", ".join(n for n, o in OPTION_NAMES.items() if o in rule.options) or "none"
        wildcards = [w for w in (WILDCARD_V4, WILDCARD_V6) if any(w in n for n in rule.networks)]
        line = f"{rule.name}: allows {_scope(rule)}; options: {options}"
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
        line = f"{rule.name}: denies {_scope(rule)}, whatever the options"
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
