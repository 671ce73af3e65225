"""The TCP ports the helper's Landlock ruleset lets it bind (policy.tcp_bind_ports),
and the policy key that makes Landlock a requirement. Pure: no kernel involved;
tests/test_landlock.py checks the ruleset itself in the kernel."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from privsock.helper.policy import Policy, decide, tcp_bind_ports
from privsock.helper.policyparse import PolicyError, parse_policy
from privsock.helper.protocol import Create, Option, Transport

from .test_policy import ADDRESSES, POLICY_DIR, doc, policies, rule

ALLOW_TCP = rule(transports='["tcp"]', ports='[53, 80, "1000-1003"]',
                 addresses='["0.0.0.0/0", "::/0"]')  # fmt: skip


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        # ports and ranges of every TCP allow rule, sorted, each once
        ((ALLOW_TCP,), (53, 80, 1000, 1001, 1002, 1003)),
        ((ALLOW_TCP, rule(transports='["udp", "tcp"]', ports="[80, 443]")), (53, 80, 443, 1000,
                                                                             1001, 1002, 1003)),
        # no TCP allow rule: no port at all
        ((rule(transports='["udp"]', ports='[53, "60-70"]'),), ()),
        ((rule("deny", ports="[22]"),), ()),
        # a deny rule on every address takes the port out, also from inside a range
        ((ALLOW_TCP, rule("deny", ports='[80, "1001-1002"]')), (53, 1000, 1003)),
        # ... a UDP-only deny rule does not
        ((ALLOW_TCP, rule("deny", transports='["udp"]', ports="[80]")), (53, 80, 1000, 1001,
                                                                         1002, 1003)),
        # a deny rule on some addresses leaves the port: it is granted elsewhere
        ((ALLOW_TCP, rule("deny", ports="[80]", addresses='["10.0.0.0/8", "::1"]')),
         (53, 80, 1000, 1001, 1002, 1003)),
        # two deny rules, one per family, together deny every address
        ((ALLOW_TCP, rule("deny", ports="[80]", addresses='["0.0.0.0/0"]'),
          rule("deny", ports="[53]", addresses='["::/0"]'),
          rule("deny", ports='["50-80"]', addresses='["::/0"]')), (53, 1000, 1001, 1002, 1003)),
        # "every address" means every address the allow rule has
        ((rule(transports='["tcp"]', ports='["8000-8002"]', addresses='["127.0.0.0/8"]'),
          rule("deny", ports="[8001]", addresses='["127.0.0.0/8"]')), (8000, 8002)),
        # a rule granting only the wildcard loses it to any deny network of its family
        ((rule(transports='["tcp"]', ports="[80, 81]", addresses='["0.0.0.0/32"]'),
          rule("deny", ports="[80]", addresses='["192.0.2.0/24"]')), (81,)),
        # the whole port space
        ((rule(transports='["tcp"]', ports='["1-65535"]', addresses='["::/0"]'),
          rule("deny", ports="[22]")), tuple(p for p in range(1, 65536) if p != 22)),
    ],
)  # fmt: skip
def test_tcp_bind_ports(parts: tuple[str, ...], expected: tuple[int, ...]) -> None:
    assert tcp_bind_ports(parse_policy(doc(*parts))) == expected


def test_default_policy_tcp_ports() -> None:
    policy = parse_policy((POLICY_DIR / "default.toml").read_text())
    assert tcp_bind_ports(policy) == (53, 80, 443)


@given(policies)
@settings(max_examples=300, deadline=None)
def test_every_tcp_grant_is_inside_the_ruleset(policy: Policy) -> None:
    # Were a granted port missing, the kernel would refuse a bind the policy allows.
    ports = set(tcp_bind_ports(policy))
    for port in range(1, 18):
        if port in ports:
            continue
        for address in ADDRESSES:
            for options in map(Option, range(8)):
                create = Create(1, Transport.TCP, address, port, options)
                assert not decide(policy, create).allowed, (
                    port, address, options, ports,
                )  # fmt: skip


@given(policies)
@settings(max_examples=300, deadline=None)
def test_ruleset_holds_only_tcp_allow_ports(policy: Policy) -> None:
    allowed = {
        p
        for r in policy.allow if Transport.TCP in r.transports
        for lo, hi in r.ports for p in range(lo, hi + 1)
    }  # fmt: skip
    assert set(tcp_bind_ports(policy)) <= allowed


@pytest.mark.parametrize(("text", "expected"), [("", True), ("require_landlock = true", True),
                                                ("require_landlock = false", False)])  # fmt: skip
def test_require_landlock_key(text: str, expected: bool) -> None:
    assert parse_policy(doc(f"[helper]\n{text}", rule())).require_landlock is expected


@pytest.mark.parametrize("value", ['"false"', "0", "1", "[]"])
def test_require_landlock_must_be_a_boolean(value: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(doc(f"[helper]\nrequire_landlock = {value}", rule()))
    assert caught.value.key == "helper.require_landlock"
    assert "must be true or false" in caught.value.problem
