"""The policy parser, the decision function and describe: pure and fast."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privsock.helper.policy import Decision, Peer, Policy, RateLimit, Rule, decide, judge, rules_for
from privsock.helper.policyparse import PolicyError, parse_policy
from privsock.helper.protocol import Create, Option, Reason, Transport
from privsock.policyview import describe, warnings
from tests import legacy_helper

POLICY_DIR = Path(__file__).resolve().parent.parent / "policy"

UDP, TCP = Transport.UDP, Transport.TCP
NONE, RA, RP, V6 = Option(0), Option.REUSEADDR, Option.REUSEPORT, Option.V6ONLY
PORT, ADDRESS, TRANSPORT, OPTION = Reason.PORT, Reason.ADDRESS, Reason.TRANSPORT, Reason.OPTION
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_RULE_DEFAULTS = {
    "allow": {"transports": '["udp"]', "ports": "[53]", "addresses": '["0.0.0.0/0"]'},
    "deny": {"ports": "[22]"},
}


def rule(kind: str = "allow", **fields: str | None) -> str:
    """A [[kind]] table: valid defaults, overridden by raw TOML values; None drops a key."""
    merged = {**_RULE_DEFAULTS[kind], **fields}
    body = "".join(f"{key} = {value}\n" for key, value in merged.items() if value is not None)
    return f"[[{kind}]]\n{body}"


def doc(*parts: str) -> str:
    return "version = 1\n" + "\n".join(parts)


# ---------------------------------------------------------------------------
# Parser errors: one case per kind of mistake, with the exact key path.

ERRORS = [
    # TOML and document structure
    (
        "toml-syntax",
        doc(rule(ports="53 54")),
        "line 4, column 12",
        "invalid TOML: Expected newline",
    ),
    ("toml-nesting", "a = " + "[" * 5000, "document", "nested too deeply"),
    ("toml-huge-int", "version = " + "1" * 5000, "document",
     "invalid TOML: a number has more than 4300 digits"),
    ("no-version", rule(), "version", "missing: a policy starts with version = 1"),
    ("version-2", "version = 2\n" + rule(), "version", "unsupported version 2"),
    ("version-string", 'version = "1"\n', "version", "must be an integer, not a string"),
    ("version-bool", "version = true\n", "version", "must be an integer, not a boolean"),
    ("version-date", "version = 1979-05-27\n", "version", "must be an integer, not a date or time"),
    ("unknown-top", doc("alow = 1", rule()), "alow", 'unknown key "alow" (did you mean "allow"?)'),
    ("unknown-rule", doc(rule(prots="[1]")), "allow[0].prots", '(did you mean "ports"?)'),
    ("unknown-helper", doc("[helper]\nusr = 'x'", rule()), "helper.usr", '(did you mean "user"?)'),
    ("unknown-no-match", doc(rule(colour="1")), "allow[0].colour", "expected one of transports"),
    ("unknown-quoted", doc(rule(**{'"a\\nb"': "1"})), 'allow[0]."a\\nb"', 'unknown key "a\\nb"'),
    (
        "deny-options",
        doc(rule("deny", options="[]")),
        "deny[0].options",
        "a deny rule has no options",
    ),
    ("helper-not-table", doc("helper = 1", rule()), "helper", "must be a table, not an integer"),
    ("allow-table", doc("[allow]\nports = [1]"), "allow", "must be an array of tables ([[allow]])"),
    ("allow-empty", doc("allow = []"), "allow", "must not be empty"),
    ("rule-not-table", doc("allow = [1]"), "allow[0]", "must be a table, not an integer"),
    ("grants-nothing", doc(), "document", "policy grants nothing"),
    # required keys and arrays
    ("allow-no-addresses", doc(rule(addresses=None)), "allow[0].addresses", "missing"),
    ("allow-no-transports", doc(rule(transports=None)), "allow[0].transports", "missing"),
    ("deny-no-ports", doc(rule(), rule("deny", ports=None)), "deny[0].ports", "missing"),
    ("ports-empty", doc(rule(ports="[]")), "allow[0].ports", "must not be empty"),
    ("transports-empty", doc(rule(transports="[]")), "allow[0].transports", "must not be empty"),
    ("addresses-empty", doc(rule(addresses="[]")), "allow[0].addresses", "must not be empty"),
    (
        "ports-not-array",
        doc(rule(ports="53")),
        "allow[0].ports",
        "must be an array, not an integer",
    ),
    # ports
    ("port-bool", doc(rule(ports="[true]")), "allow[0].ports[0]", "not a boolean"),
    ("port-float", doc(rule(ports="[53.0]")), "allow[0].ports[0]", "not a float"),
    ("port-0", doc(rule(ports="[0]")), "allow[0].ports[0]", "port 0 is outside 1-65535"),
    ("port-65536", doc(rule(ports="[53, 65536]")), "allow[0].ports[1]", "port 65536 is outside"),
    ("range-0", doc(rule(ports='["0-10"]')), "allow[0].ports[0]", "port 0 is outside 1-65535"),
    (
        "range-reversed",
        doc(rule(ports='["90-80"]')),
        "allow[0].ports[0]",
        'range "90-80" is reversed',
    ),
    (
        "range-junk",
        doc(rule(ports='["80..90"]')),
        "allow[0].ports[0]",
        'is not a "lo-hi" port range',
    ),
    (
        "port-as-string",
        doc(rule(ports='["53"]')),
        "allow[0].ports[0]",
        "write a single port as an integer",
    ),
    (
        "port-duplicate",
        doc(rule(ports="[53, 80, 53]")),
        "allow[0].ports[2]",
        "53 duplicates 53 (allow[0].ports[0])",
    ),
    (
        "port-overlap",
        doc(rule(ports='[53, "50-60"]')),
        "allow[0].ports[1]",
        "50-60 overlaps 53 (allow[0].ports[0])",
    ),
    # addresses
    (
        "cidr-host-bits",
        doc(rule(addresses='["10.0.0.1/8"]')),
        "allow[0].addresses[0]",
        "has host bits set (did you mean 10.0.0.0/8?)",
    ),
    (
        "cidr-prefix",
        doc(rule(addresses='["10.0.0.0/33"]')),
        "allow[0].addresses[0]",
        "not a valid IPv4 or IPv6 network",
    ),
    (
        "cidr-name",
        doc(rule(addresses='["localhost"]')),
        "allow[0].addresses[0]",
        "is not an address or CIDR",
    ),
    (
        "cidr-netmask",
        doc(rule(addresses='["10.0.0.0/255.0.0.0"]')),
        "allow[0].addresses[0]",
        "is not an address or CIDR",
    ),
    (
        "cidr-scope",
        doc(rule(addresses='["fe80::1%eth0"]')),
        "allow[0].addresses[0]",
        "scoped addresses",
    ),
    (
        "cidr-mapped",
        doc(rule(addresses='["::ffff:10.0.0.0/104"]')),
        "allow[0].addresses[0]",
        "write 10.0.0.0/8",
    ),
    (
        "cidr-not-string",
        doc(rule(addresses="[167772160]")),
        "allow[0].addresses[0]",
        "must be a string, not an integer",
    ),
    (
        "cidr-duplicate",
        doc(rule(addresses='["::1", "::1/128"]')),
        "allow[0].addresses[1]",
        "duplicates allow[0].addresses[0]",
    ),
    # transports and options
    (
        "transport-unknown",
        doc(rule(transports='["sctp"]')),
        "allow[0].transports[0]",
        'unknown transport "sctp"',
    ),
    (
        "transport-case",
        doc(rule(transports='["UDP"]')),
        "allow[0].transports[0]",
        '(did you mean "udp"?)',
    ),
    (
        "transport-duplicate",
        doc(rule(transports='["udp", "tcp", "udp"]')),
        "allow[0].transports[2]",
        "duplicate transport",
    ),
    (
        "option-unknown",
        doc(rule(options='["reuse_addr"]')),
        "allow[0].options[0]",
        '(did you mean "reuseaddr"?)',
    ),
    (
        "option-duplicate",
        doc(rule(options='["reuseaddr", "reuseaddr"]')),
        "allow[0].options[1]",
        "duplicate option",
    ),
    (
        "v6only-no-ipv6",
        doc(rule(options='["reuseaddr", "v6only"]')),
        "allow[0].options[1]",
        "v6only needs an IPv6 network",
    ),
    (
        "udp-reuseaddr",
        doc(rule(options='["v6only", "reuseaddr"]', addresses='["::/0"]')),
        "allow[0].options[1]",
        "reuseaddr is never granted for udp: on UDP, SO_REUSEADDR lets a socket take over "
        "a port that another service holds with SO_REUSEADDR (port hijack",
    ),
    (
        "udp-and-tcp-reuseaddr",
        doc(rule(transports='["tcp", "udp"]', options='["reuseaddr"]')),
        "allow[0].options[0]",
        "reuseaddr is never granted for udp",
    ),
    # helper
    (
        "user-root",
        doc('[helper]\nuser = "root"', rule()),
        "helper.user",
        'user "root" is not allowed',
    ),
    (
        "group-root",
        doc('[helper]\ngroup = "root"', rule()),
        "helper.group",
        'group "root" is not allowed',
    ),
    (
        "user-space",
        doc('[helper]\nuser = "a b"', rule()),
        "helper.user",
        '"a b" is not a valid user name',
    ),
    (
        "user-digit",
        doc('[helper]\nuser = "0day"', rule()),
        "helper.user",
        "is not a valid user name",
    ),
    (
        "group-dash",
        doc('[helper]\ngroup = "-g"', rule()),
        "helper.group",
        "is not a valid group name",
    ),
    (
        "user-long",
        doc(f'[helper]\nuser = "{"u" * 33}"', rule()),
        "helper.user",
        "at most 32 characters",
    ),
    (
        "user-int",
        doc("[helper]\nuser = 1000", rule()),
        "helper.user",
        "must be a string, not an integer",
    ),
    # rate limit
    (
        "rate-zero",
        doc("[rate_limit]\nrate = 0", rule()),
        "rate_limit.rate",
        "0 is outside 0 < rate <= 100000",
    ),
    ("rate-high", doc("[rate_limit]\nrate = 100000.5", rule()), "rate_limit.rate", "is outside"),
    ("rate-inf", doc("[rate_limit]\nrate = inf", rule()), "rate_limit.rate", "inf is outside"),
    ("rate-nan", doc("[rate_limit]\nrate = nan", rule()), "rate_limit.rate", "nan is outside"),
    (
        "rate-string",
        doc('[rate_limit]\nrate = "20"', rule()),
        "rate_limit.rate",
        "must be a number, not a string",
    ),
    (
        "rate-bool",
        doc("[rate_limit]\nrate = true", rule()),
        "rate_limit.rate",
        "must be a number, not a boolean",
    ),
    (
        "burst-zero",
        doc("[rate_limit]\nburst = 0", rule()),
        "rate_limit.burst",
        "0 is outside 1-100000",
    ),
    (
        "burst-high",
        doc("[rate_limit]\nburst = 100001", rule()),
        "rate_limit.burst",
        "100001 is outside 1-100000",
    ),
    (
        "burst-float",
        doc("[rate_limit]\nburst = 4.0", rule()),
        "rate_limit.burst",
        "must be an integer, not a float",
    ),
    # rules that can never match
    (
        "covered-by-one",
        doc(rule(ports="[53, 54]"), rule("deny", ports='["50-60"]', transports='["udp"]')),
        "allow[0]",
        "allow[0] can never match: deny[0] covers it",
    ),
    (
        "covered-wildcard-only",
        doc(
            rule(addresses='["0.0.0.0/32", "::/128"]'),
            rule("deny", ports="[53]", addresses='["10.0.0.0/8", "2001:db8::/32"]'),
        ),
        "allow[0]",
        "allow[0] can never match: deny[0] covers it",
    ),
    (
        "covered-by-several",
        doc(
            rule("deny", ports="[1]"),
            rule(transports='["udp", "tcp"]', ports='["53-54"]', addresses='["10.0.0.0/8", "::1"]'),
            rule("deny", ports="[53]", transports='["udp"]'),
            rule("deny", ports="[54]", transports='["udp"]', addresses='["10.0.0.0/8", "::/0"]'),
            rule("deny", ports='["53-54"]', transports='["tcp"]', addresses='["10.128.0.0/9"]'),
            rule(
                "deny", ports='["53-54"]', transports='["tcp"]', addresses='["::/0", "10.0.0.0/9"]'
            ),
        ),
        "allow[0]",
        "allow[0] can never match: deny[1] and deny[2] and deny[3] and deny[4] cover it",
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "fragment"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS]
)
def test_parser_rejects(text: str, key: str, fragment: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "t.toml")
    err = caught.value
    assert (err.source, err.key) == ("t.toml", key)
    assert fragment in err.problem
    assert str(err) == f"t.toml: {key}: {err.problem}"
    assert "\n" not in str(err)


@pytest.mark.parametrize(
    "deny",
    [
        rule("deny", ports="[53]", transports='["tcp"]'),  # other transport
        rule("deny", ports="[53]", addresses='["10.0.0.0/8"]'),  # part of the addresses
        rule("deny", ports='["50-60"]', addresses='["::/0"]'),  # other family
    ],
)
def test_partly_denied_allow_rule_is_accepted(deny: str) -> None:
    policy = parse_policy(doc(rule(), deny))
    assert [r.name for r in policy.allow] == ["allow[0]"]


def test_wildcard_denied_but_an_address_left_is_accepted() -> None:
    allow = rule(addresses='["0.0.0.0/32", "127.0.0.1"]')
    policy = parse_policy(doc(allow, rule("deny", ports="[53]", addresses='["10.0.0.0/8"]')))
    assert decide(policy, Create(1, UDP, ipaddress.ip_address("127.0.0.1"), 53, NONE)).allowed
    wildcard = Create(1, UDP, ipaddress.ip_address("0.0.0.0"), 53, NONE)
    assert decide(policy, wildcard).rule == "deny[0]"


def test_covered_check_needs_every_port() -> None:
    text = doc(rule(ports='["53-54"]'), rule("deny", ports="[53]"))
    assert parse_policy(text).allow[0].ports == ((53, 54),)


def test_defaults() -> None:
    policy = parse_policy(doc(rule(), rule("deny")))
    assert (policy.user, policy.group) == ("privsock", "privsock")
    assert policy.rate_limit == RateLimit(20.0, 40)
    assert policy.allow == (
        Rule(0, "allow", frozenset({UDP}), ((53, 53),), (ipaddress.ip_network("0.0.0.0/0"),), NONE),
    )
    assert policy.deny == (
        Rule(
            0,
            "deny",
            frozenset({UDP, TCP}),
            ((22, 22),),
            (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")),
            NONE,
        ),
    )


def test_full_rule_and_helper() -> None:
    policy = parse_policy(
        doc(
            '[helper]\nuser = "svc_dns"',
            "[rate_limit]\nrate = 7\nburst = 3",
            rule(
                transports='["tcp"]',
                ports='[53, "8000-8080", 1]',
                addresses='["127.0.0.1", "::1", "10.0.0.0/8", "0.0.0.0/0"]',
                options='["v6only", "reuseport", "reuseaddr"]',
            ),
            rule(options="[]"),
        )
    )
    assert (policy.user, policy.group) == ("svc_dns", "svc_dns")  # group defaults to the user
    assert policy.rate_limit == RateLimit(7.0, 3)
    assert isinstance(policy.rate_limit.rate, float)
    first, second = policy.allow
    assert first.transports == frozenset({TCP})
    assert first.ports == ((53, 53), (8000, 8080), (1, 1))
    assert [str(n) for n in first.networks] == [
        "127.0.0.1/32",
        "::1/128",
        "10.0.0.0/8",
        "0.0.0.0/0",
    ]
    assert first.options == RA | RP | V6
    assert second.options == NONE
    assert (first.name, second.name) == ("allow[0]", "allow[1]")


def test_deny_only_policy_is_accepted_and_grants_nothing() -> None:
    policy = parse_policy(doc(rule("deny")))
    assert policy.allow == ()
    assert decide(policy, Create(1, UDP, ipaddress.ip_address("127.0.0.1"), 53, NONE)) == Decision(
        False, PORT, "default"
    )


# ---------------------------------------------------------------------------
# The bundled policies


def test_default_policy() -> None:
    policy = parse_policy((POLICY_DIR / "default.toml").read_text(), "default.toml")
    anywhere = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    assert (policy.user, policy.group) == ("privsock", "privsock")
    assert policy.rate_limit == RateLimit(50.0, 100)
    assert policy.allow == (
        Rule(0, "allow", frozenset({UDP}), ((53, 53),), anywhere, V6),
        Rule(1, "allow", frozenset({TCP}), ((53, 53), (80, 80), (443, 443)), anywhere, RA | V6),
    )
    assert policy.deny == (Rule(0, "deny", frozenset({UDP, TCP}), ((22, 22),), anywhere, NONE),)


EXAMPLES = sorted((POLICY_DIR / "examples").glob("*.toml"))


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"dns-loopback.toml", "web.toml", "bench.toml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_parses(path: Path) -> None:
    policy = parse_policy(path.read_text(), path.name)
    assert policy.allow
    assert describe(policy)


def test_bench_example_limits() -> None:
    policy = parse_policy((POLICY_DIR / "examples" / "bench.toml").read_text())
    assert policy.rate_limit == RateLimit(100000.0, 100000)
    assert [(r.transports, r.options) for r in policy.allow] == [
        (frozenset({UDP}), RP | V6),
        (frozenset({TCP}), RA | RP | V6),
    ]
    assert {r.ports for r in policy.allow} == {((900, 929),)}


@pytest.mark.parametrize("path", [POLICY_DIR / "default.toml", *EXAMPLES], ids=lambda p: p.name)
def test_only_the_bench_policy_grants_reuseport(path: Path) -> None:
    policy = parse_policy(path.read_text(), path.name)
    grants_reuseport = any(r.options & RP for r in policy.allow)
    assert grants_reuseport == (path.name == "bench.toml")


# ---------------------------------------------------------------------------
# Decisions

TABLE_POLICY = parse_policy(
    doc(
        # allow[0]: 53 and 8000-8080 anywhere
        rule(
            transports='["udp", "tcp"]',
            ports='[53, "8000-8080"]',
            addresses='["0.0.0.0/0", "::/0"]',
            options='["reuseport", "v6only"]',
        ),
        # allow[1]: tcp 80 on loopback only, reuseport only
        rule(
            transports='["tcp"]',
            ports="[80]",
            addresses='["127.0.0.0/8", "::1"]',
            options='["reuseport"]',
        ),
        # allow[2]: IPv6 only, so dual-stack :: is not covered
        rule(ports="[5353]", addresses='["::/0"]', options='["v6only"]'),
        # allow[3]: a network without the wildcard
        rule(
            transports='["tcp"]',
            ports="[9000]",
            addresses='["10.0.0.0/8"]',
            options='["reuseaddr"]',
        ),
        # deny[0]: a port inside allow[0]'s range, every address
        rule("deny", ports="[8022]"),
        # deny[1]: one IPv4 network only
        rule("deny", transports='["tcp"]', ports="[8053]", addresses='["192.168.1.0/24"]'),
        # deny[2]: one IPv6 network only
        rule("deny", transports='["udp"]', ports="[8054]", addresses='["2001:db8::/32"]'),
    )
)

DECISIONS = [
    # (transport, address, port, options, allowed, reason, rule)
    ("plain", UDP, "0.0.0.0", 53, NONE, True, None, "allow[0]"),
    ("plain-addr", TCP, "8.8.8.8", 53, NONE, True, None, "allow[0]"),
    ("range-low", TCP, "0.0.0.0", 8000, NONE, True, None, "allow[0]"),
    ("range-high", TCP, "0.0.0.0", 8080, NONE, True, None, "allow[0]"),
    ("below-range", TCP, "0.0.0.0", 7999, NONE, False, PORT, "default"),
    ("above-range", TCP, "0.0.0.0", 8081, NONE, False, PORT, "default"),
    ("no-rule-has-port", UDP, "127.0.0.1", 1, NONE, False, PORT, "default"),
    # deny wins over allow
    ("deny-wins", UDP, "0.0.0.0", 8022, NONE, False, PORT, "deny[0]"),
    ("deny-wins-v6", TCP, "::1", 8022, V6, False, PORT, "deny[0]"),
    ("deny-wins-mapped", TCP, "::ffff:1.2.3.4", 8022, NONE, False, PORT, "deny[0]"),
    # wildcard against an address-specific deny
    ("deny-addr", TCP, "192.168.1.7", 8053, NONE, False, PORT, "deny[1]"),
    ("deny-addr-outside", TCP, "10.0.0.1", 8053, NONE, True, None, "allow[0]"),
    ("deny-addr-v4-wildcard", TCP, "0.0.0.0", 8053, NONE, False, PORT, "deny[1]"),
    ("deny-addr-dual-stack", TCP, "::", 8053, NONE, False, PORT, "deny[1]"),
    ("deny-addr-v6only-wildcard", TCP, "::", 8053, V6, True, None, "allow[0]"),
    ("deny-addr-other-transport", UDP, "0.0.0.0", 8053, NONE, True, None, "allow[0]"),
    ("deny-addr-mapped", TCP, "::ffff:192.168.1.7", 8053, NONE, False, PORT, "deny[1]"),
    ("deny-v6-net-v6-wildcard", UDP, "::", 8054, V6, False, PORT, "deny[2]"),
    ("deny-v6-net-dual-stack", UDP, "::", 8054, NONE, False, PORT, "deny[2]"),
    ("deny-v6-net-v4-wildcard", UDP, "0.0.0.0", 8054, NONE, True, None, "allow[0]"),
    ("deny-v6-net-outside", UDP, "2001:db9::1", 8054, NONE, True, None, "allow[0]"),
    # CIDR membership
    ("cidr-in", TCP, "127.0.0.1", 80, NONE, True, None, "allow[1]"),
    ("cidr-last", TCP, "127.255.255.255", 80, NONE, True, None, "allow[1]"),
    ("cidr-out", TCP, "128.0.0.1", 80, NONE, False, ADDRESS, "default"),
    ("cidr-v6-in", TCP, "::1", 80, NONE, True, None, "allow[1]"),
    ("cidr-v6-out", TCP, "::2", 80, NONE, False, ADDRESS, "default"),
    ("wildcard-needs-wildcard-net", TCP, "0.0.0.0", 9000, NONE, False, ADDRESS, "default"),
    ("net-without-wildcard", TCP, "10.9.9.9", 9000, NONE, True, None, "allow[3]"),
    # options must be a subset of the rule's
    ("option-permitted", TCP, "127.0.0.1", 80, RP, True, None, "allow[1]"),
    ("option-not-permitted", TCP, "127.0.0.1", 80, RA, False, OPTION, "default"),
    ("option-partly-permitted", TCP, "127.0.0.1", 80, RA | RP, False, OPTION, "default"),
    ("options-subset", UDP, "::", 53, RP | V6, True, None, "allow[0]"),
    ("reuseaddr-refused", UDP, "0.0.0.0", 53, RA, False, OPTION, "default"),
    # IPv4-mapped addresses are judged as IPv4
    ("mapped-allowed", TCP, "::ffff:127.0.0.1", 80, NONE, True, None, "allow[1]"),
    ("mapped-v4-rule", TCP, "::ffff:10.1.2.3", 9000, NONE, True, None, "allow[3]"),
    ("mapped-not-in-v6-net", UDP, "::ffff:8.8.8.8", 5353, NONE, False, ADDRESS, "default"),
    ("mapped-wildcard", TCP, "::ffff:0.0.0.0", 9000, NONE, False, ADDRESS, "default"),
    # dual-stack wildcard against v6only
    ("v6only-wildcard", UDP, "::", 5353, V6, True, None, "allow[2]"),
    ("dual-stack-needs-v4", UDP, "::", 5353, NONE, False, ADDRESS, "default"),
    ("v6-specific", UDP, "2001:db8::1", 5353, NONE, True, None, "allow[2]"),
    # the reason is the dimension of the rule that got furthest
    ("reason-transport", UDP, "127.0.0.1", 80, NONE, False, TRANSPORT, "default"),
    ("reason-address", TCP, "10.0.0.1", 80, RP, False, ADDRESS, "default"),
    ("reason-option", TCP, "10.1.1.1", 9000, RP, False, OPTION, "default"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("transport", "address", "port", "options", "allowed", "reason", "rule_name"),
    [c[1:] for c in DECISIONS],
    ids=[c[0] for c in DECISIONS],
)
def test_decide(
    transport: Transport,
    address: str,
    port: int,
    options: Option,
    allowed: bool,
    reason: Reason | None,
    rule_name: str,
) -> None:
    got = decide(TABLE_POLICY, Create(1, transport, ipaddress.ip_address(address), port, options))
    assert got == Decision(allowed, reason, rule_name)


# A Policy object the parser would refuse: reuseaddr for both transports.
_ANYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
CARRIES_UDP_REUSEADDR = Policy(
    "privsock", "privsock", RateLimit(1.0, 1),
    (Rule(0, "allow", frozenset({UDP, TCP}), ((53, 53),), _ANYWHERE, RA | RP | V6),),
    (),
)  # fmt: skip


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.53", "0.0.0.0", "::", "::1"])
@pytest.mark.parametrize("options", [RA, RA | RP, RA | V6])
def test_udp_reuseaddr_is_denied_even_if_a_rule_carries_it(address: str, options: Option) -> None:
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        options &= ~V6
    got = decide(CARRIES_UDP_REUSEADDR, Create(1, UDP, ip, 53, options))
    assert got == Decision(False, OPTION, "default")
    # The same rule still grants it for TCP, and grants UDP without reuseaddr.
    assert decide(CARRIES_UDP_REUSEADDR, Create(1, TCP, ip, 53, options)).allowed
    assert decide(CARRIES_UDP_REUSEADDR, Create(1, UDP, ip, 53, options & ~RA)).allowed


@pytest.mark.parametrize("reverse", [False, True])
def test_reason_is_from_the_rule_that_got_furthest(reverse: bool) -> None:
    rules = [
        rule(transports='["tcp"]', ports="[80]"),  # udp fails at the transport
        rule(transports='["udp"]', ports="[80]", addresses='["127.0.0.0/8"]'),  # at the address
        rule(transports='["udp"]', ports="[81]"),  # at the port
    ]
    policy = parse_policy(doc(*(reversed(rules) if reverse else rules)))
    got = decide(policy, Create(1, UDP, ipaddress.ip_address("10.0.0.1"), 80, NONE))
    assert got == Decision(False, ADDRESS, "default")


def test_reason_transport_example() -> None:
    policy = parse_policy(
        doc(
            rule(transports='["udp", "tcp"]', ports="[53]"),
            rule(transports='["tcp"]', ports="[80]"),
        )
    )
    got = decide(policy, Create(1, UDP, ipaddress.ip_address("0.0.0.0"), 80, NONE))
    assert got == Decision(False, TRANSPORT, "default")


def test_reason_address_example() -> None:
    policy = parse_policy((POLICY_DIR / "examples" / "dns-loopback.toml").read_text())
    got = decide(policy, Create(1, UDP, ipaddress.ip_address("10.9.9.9"), 53, NONE))
    assert got == Decision(False, ADDRESS, "default")
    wildcard = Create(1, UDP, ipaddress.ip_address("0.0.0.0"), 53, NONE)
    assert decide(policy, wildcard).reason is ADDRESS
    assert decide(policy, Create(1, TCP, ipaddress.ip_address("127.0.0.53"), 53, NONE)).allowed


def test_dual_stack_may_be_granted_by_two_rules() -> None:
    policy = parse_policy(
        doc(
            rule(transports='["tcp"]', ports="[80]", addresses='["0.0.0.0/0"]'),
            rule(transports='["tcp"]', ports="[80]", addresses='["::/0"]'),
        )
    )
    assert decide(policy, Create(1, TCP, ipaddress.ip_address("::"), 80, NONE)) == Decision(
        True, None, "allow[1]"
    )


README_TABLE = [
    (UDP, "0.0.0.0", 53, NONE, Decision(True, None, "allow[0]")),
    (UDP, "127.0.0.1", 53, RA, Decision(False, OPTION, "default")),
    (TCP, "::", 443, NONE, Decision(True, None, "allow[1]")),
    (TCP, "::ffff:127.0.0.1", 80, NONE, Decision(True, None, "allow[1]")),
    (TCP, "0.0.0.0", 22, NONE, Decision(False, PORT, "deny[0]")),
    (UDP, "0.0.0.0", 80, NONE, Decision(False, TRANSPORT, "default")),
    (TCP, "0.0.0.0", 80, RP, Decision(False, OPTION, "default")),
    (UDP, "0.0.0.0", 8080, NONE, Decision(False, PORT, "default")),
]


@pytest.mark.parametrize(("transport", "address", "port", "options", "expected"), README_TABLE)
def test_default_policy_matches_readme(
    transport: Transport, address: str, port: int, options: Option, expected: Decision
) -> None:
    policy = parse_policy((POLICY_DIR / "default.toml").read_text())
    create = Create(1, transport, ipaddress.ip_address(address), port, options)
    assert decide(policy, create) == expected


# ---------------------------------------------------------------------------
# describe


def test_describe_default() -> None:
    policy = parse_policy((POLICY_DIR / "default.toml").read_text())
    assert describe(policy) == [
        "runs as user privsock, group privsock",
        "rate limit: 50 CREATE requests per second sustained, bursts of up to 100",
        "allow[0]: allows udp port 53 on any address; options: v6only; "
        "includes wildcard binds to 0.0.0.0 and ::",
        "allow[1]: allows tcp ports 53, 80, 443 on any address; options: reuseaddr, v6only; "
        "includes wildcard binds to 0.0.0.0 and ::",
        "deny[0]: denies udp+tcp port 22 on any address, whatever the options",
        "everything else is denied; deny rules win over allow rules",
    ]


def test_describe_spells_out_wildcard_denies() -> None:
    policy = parse_policy(
        doc(
            "[rate_limit]\nrate = 0.5\nburst = 1",
            rule(ports='["1000-1023"]', addresses='["127.0.0.0/8"]'),
            rule("deny", transports='["tcp"]', ports="[8080]", addresses='["10.0.0.0/8"]'),
            rule("deny", ports="[8081]", addresses='["2001:db8::/32"]'),
        )
    )
    assert describe(policy)[1:] == [
        "rate limit: 0.5 CREATE requests per second sustained, bursts of up to 1",
        "allow[0]: allows udp ports 1000-1023 on 127.0.0.0/8; options: none",
        "deny[0]: denies tcp port 8080 on 10.0.0.0/8, whatever the options; "
        "this also denies wildcard binds to 0.0.0.0 and dual-stack ::",
        "deny[1]: denies udp+tcp port 8081 on 2001:db8::/32, whatever the options; "
        "this also denies wildcard binds to ::",
        "everything else is denied; deny rules win over allow rules",
    ]


def test_warnings_name_each_rule_granting_reuseport() -> None:
    policy = parse_policy(
        doc(
            '[helper]\nuser = "svc"',
            rule(transports='["tcp"]', ports="[80]", options='["reuseaddr", "reuseport"]'),
            rule(ports="[53]", options="[]"),
            rule(ports='["1000-1001"]', addresses='["127.0.0.0/8"]', options='["reuseport"]'),
        )
    )
    assert warnings(policy) == [
        "allow[0] grants reuseport on tcp port 80 on 0.0.0.0/0: every socket the helper "
        "creates belongs to user svc, so any boss of any helper running as svc that may bind "
        "the same address and port with reuseport joins the group and gets a share of its "
        "traffic; grant it only where a single boss uses this helper user",
        "allow[2] grants reuseport on udp ports 1000-1001 on 127.0.0.0/8: every socket the "
        "helper creates belongs to user svc, so any boss of any helper running as svc that "
        "may bind the same address and port with reuseport joins the group and gets a share "
        "of its traffic; grant it only where a single boss uses this helper user",
    ]
    assert warnings(parse_policy((POLICY_DIR / "default.toml").read_text())) == []


OWN_RULE = 'give tcp a rule of its own with options = ["reuseaddr"] (udp cannot have it)'


@pytest.mark.parametrize(
    ("transports", "options", "fix"),
    [
        ('["tcp"]', "[]", 'add options = ["reuseaddr"]'),
        ('["tcp"]', '["v6only"]', 'add options = ["reuseaddr"]'),
        ('["udp", "tcp"]', '["reuseport"]', OWN_RULE),
        ('["udp", "tcp"]', "[]", OWN_RULE),
        ('["tcp"]', '["reuseaddr"]', None),
        ('["udp"]', "[]", None),
    ],
)
def test_describe_notes_tcp_rules_exec_would_be_refused_by(
    transports: str, options: str, fix: str | None
) -> None:
    addresses = '["::/0"]' if "v6only" in options else '["0.0.0.0/0"]'
    policy = parse_policy(doc(rule(transports=transports, options=options, addresses=addresses)))
    line = describe(policy)[2]
    note = (
        "; note: privsock exec asks for reuseaddr on TCP sockets, which this rule refuses: "
        f"{fix}, or run exec with --no-reuseaddr"
    )
    assert line.endswith(note) if fix else "note:" not in line, line


def test_describe_deny_only() -> None:
    lines = describe(parse_policy(doc(rule("deny"))))
    assert lines[-1] == "grants nothing: there are no allow rules, so every request is denied"


# ---------------------------------------------------------------------------
# Properties

SNIPPETS = [
    "[[allow]]", "[[deny]]", "[helper]", "[rate_limit]", "[allow]", "version = 2",
    'transports = ["udp", "tcp"]', 'transports = ["udp", "udp"]', "transports = []",
    'ports = [53, "8000-8080"]', "ports = [0]", 'ports = ["9-1"]', "ports = [true]",
    'ports = [1, "1-2"]', "ports = 53", 'addresses = ["0.0.0.0/0", "::/0"]',
    'addresses = ["10.0.0.1/8"]', 'addresses = ["::1", "127.0.0.1"]', 'addresses = ["x"]',
    'options = ["v6only"]', 'options = ["reuseport"]', "options = []", 'user = "root"',
    'user = "svc"', 'group = "g"', "rate = 1e9", "rate = 0.5", "burst = 0", "burst = 5",
    "prots = [1]", "allow = 1", "= broken", '"quoted\\nkey" = 1', "deny = []",
]  # fmt: skip


def check_parse(text: str) -> None:
    """parse_policy either returns a Policy that can be used, or raises a one-line PolicyError."""
    try:
        policy = parse_policy(text, "fuzz.toml")
    except PolicyError as e:
        assert str(e).startswith("fuzz.toml: ")
        assert len(str(e).splitlines()) == 1
    else:
        assert isinstance(policy, Policy)
        describe(policy)
        decide(policy, Create(1, UDP, ipaddress.ip_address("::"), 53, NONE))


@given(st.text())
def test_parse_arbitrary_text_raises_only_policy_error(text: str) -> None:
    check_parse(text)


@given(
    st.sampled_from(["version = 1\n", "version = 1\n", ""]),
    st.lists(st.sampled_from(SNIPPETS), max_size=14),
)
@settings(max_examples=300)
def test_parse_near_policies_raises_only_policy_error(head: str, lines: list[str]) -> None:
    check_parse(head + "\n".join(lines))


NETWORKS = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/0", "0.0.0.0/32", "10.0.0.0/8", "10.1.0.0/16", "127.0.0.0/8", "192.0.2.0/24",
        "::/0", "::/128", "::1/128", "fe80::/10", "2001:db8::/32",
    )
]  # fmt: skip
ADDRESSES = [
    ipaddress.ip_address(a)
    for a in (
        "0.0.0.0", "10.1.2.3", "10.2.0.1", "127.0.0.1", "192.0.2.9", "8.8.8.8", "::", "::1",
        "fe80::1", "2001:db8::5", "2001:db9::5", "::ffff:10.1.2.3", "::ffff:0.0.0.0",
        "::ffff:8.8.8.8",
    )
]  # fmt: skip

_port_ranges = st.tuples(st.integers(1, 12), st.integers(0, 4)).map(lambda t: (t[0], t[0] + t[1]))
_rule_fields = st.tuples(
    st.frozensets(st.sampled_from(Transport), min_size=1),
    st.lists(_port_ranges, min_size=1, max_size=3).map(tuple),
    st.lists(st.sampled_from(NETWORKS), min_size=1, max_size=3, unique=True).map(tuple),
    st.integers(0, 7).map(Option),
)


def _rules(kind: Literal["allow", "deny"], max_size: int) -> st.SearchStrategy[tuple[Rule, ...]]:
    return st.lists(_rule_fields, max_size=max_size).map(
        lambda specs: tuple(
            Rule(i, kind, t, p, n, o if kind == "allow" else NONE)
            for i, (t, p, n, o) in enumerate(specs)
        )
    )


policies = st.builds(
    Policy, st.just("privsock"), st.just("privsock"), st.just(RateLimit(1.0, 1)),
    _rules("allow", 4), _rules("deny", 3),
)  # fmt: skip


def _receives(address: IPAddress, options: Option) -> list[tuple[int, IPAddress | None]]:
    """What a socket bound to ``address`` receives traffic for, as (IP version, address),
    with None for every address of that version."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if not address.is_unspecified:
        return [(address.version, address)]
    if address.version == 6 and not options & V6:
        return [(6, None), (4, None)]
    return [(address.version, None)]


def _deny_hits(
    rule: Rule, transport: Transport, address: IPAddress, port: int, options: Option
) -> bool:
    if transport not in rule.transports or not any(lo <= port <= hi for lo, hi in rule.ports):
        return False
    return any(
        net.version == version and (addr is None or addr in net)
        for version, addr in _receives(address, options)
        for net in rule.networks
    )


def _judged(address: IPAddress, options: Option) -> list[IPAddress]:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return [address.ipv4_mapped]
    if address == ipaddress.IPv6Address("::") and not options & V6:
        return [address, ipaddress.IPv4Address("0.0.0.0")]
    return [address]


def _grants(
    rule: Rule, transport: Transport, address: IPAddress, port: int, options: Option
) -> bool:
    return (
        transport in rule.transports
        and any(lo <= port <= hi for lo, hi in rule.ports)
        and any(address in net for net in rule.networks)
        and options & rule.options == options
        and not (transport is UDP and options & RA)  # never granted: port hijack
    )


@given(
    policies,
    st.sampled_from(Transport),
    st.sampled_from(ADDRESSES),
    st.integers(1, 17),
    st.integers(0, 7).map(Option),
)
@settings(max_examples=500)
def test_decide_never_allows_what_a_deny_rule_matches(
    policy: Policy, transport: Transport, address: IPAddress, port: int, options: Option
) -> None:
    got = decide(policy, Create(1, transport, address, port, options))
    hits = [r.name for r in policy.deny if _deny_hits(r, transport, address, port, options)]
    if hits:
        assert got == Decision(False, PORT, hits[0])
        return
    granting = [
        [r.name for r in policy.allow if _grants(r, transport, a, port, options)]
        for a in _judged(address, options)
    ]
    if all(granting):
        assert got == Decision(True, None, granting[0][0])
    else:
        assert not got.allowed and got.rule == "default" and got.reason is not None


def test_property_oracle_sees_wildcard_capture() -> None:
    """The oracle above must itself know that a wildcard captures a denied address."""
    deny = Rule(0, "deny", frozenset({TCP}), ((5, 5),), (ipaddress.ip_network("10.0.0.0/8"),), NONE)
    assert _deny_hits(deny, TCP, ipaddress.ip_address("::"), 5, NONE)
    assert not _deny_hits(deny, TCP, ipaddress.ip_address("::"), 5, V6)
    assert _deny_hits(deny, TCP, ipaddress.ip_address("::ffff:10.0.0.1"), 5, NONE)


# ---------------------------------------------------------------------------
# decide against the previous implementation (tests/legacy_helper.py), with
# rules for some users and groups, unresolved names and unknown peers

_names = st.sampled_from([(), ("alice",), ("alice", "bob")])
_ids = st.none() | st.frozensets(st.integers(0, 4), max_size=3)
_wide_ranges = st.sampled_from([(1, 65535), (1, 1023), (5, 65535), (65535, 65535)])
_peer_rule_fields = st.tuples(
    st.frozensets(st.sampled_from(Transport), min_size=1),
    st.lists(_port_ranges | _wide_ranges, min_size=1, max_size=3).map(tuple),
    st.lists(st.sampled_from(NETWORKS), min_size=1, max_size=3, unique=True).map(tuple),
    st.integers(0, 7).map(Option),
    _names, _names, _ids, _ids,
)  # fmt: skip


def _peer_rules(kind: Literal["allow", "deny"]) -> st.SearchStrategy[tuple[Rule, ...]]:
    return st.lists(_peer_rule_fields, max_size=4).map(
        lambda specs: tuple(
            Rule(i, kind, t, p, n, o if kind == "allow" else NONE, users, groups, uids, gids)
            for i, (t, p, n, o, users, groups, uids, gids) in enumerate(specs)
        )
    )


peer_policies = st.builds(
    Policy, st.just("privsock"), st.just("privsock"), st.just(RateLimit(1.0, 1)),
    _peer_rules("allow"), _peer_rules("deny"),
)  # fmt: skip
peers = st.none() | st.builds(
    Peer, st.integers(0, 4), st.integers(0, 4), st.just(1),
    st.none() | st.frozensets(st.integers(0, 4), max_size=3),
)  # fmt: skip


@given(
    peer_policies,
    peers,
    st.sampled_from(Transport),
    st.sampled_from(ADDRESSES) | st.ip_addresses(),
    st.integers(1, 17) | st.sampled_from([1022, 1023, 1024, 65534, 65535]),
    st.integers(0, 7).map(Option),
)
@settings(max_examples=1000)
def test_decide_is_the_previous_decide(
    policy: Policy,
    peer: Peer | None,
    transport: Transport,
    address: IPAddress,
    port: int,
    options: Option,
) -> None:
    create = Create(1, transport, address, port, options)
    want = legacy_helper.decide(policy, create, peer)
    assert decide(policy, create, peer) == want
    assert judge(rules_for(policy, peer), create) == want


def test_rules_for_cuts_ports_at_every_range_end() -> None:
    rule = Rule(0, "allow", frozenset({TCP}), ((53, 53), (80, 90)), _ANYWHERE, NONE)
    rules = rules_for(Policy("privsock", "privsock", RateLimit(1.0, 1), (rule,), ()), None)
    assert rules.starts == (0, 53, 54, 80, 91)
    assert [len(allows) for _, allows in rules.rules] == [0, 1, 0, 1, 0]
