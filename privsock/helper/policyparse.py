"""The policy file's parser: strict, pure, no I/O. Runs as root before the drop.

The privsock policy: the model, a strict parser and the decision function. Pure, no I/O.

Format (TOML; policy/README.md has the same with examples)::

    version = 1                  # required, must be 1

    [helper]                     # optional
    user = "privsock"            # default "privsock"
    group = "privsock"           # default: the user's name
    require_landlock = true      # default true: refuse to start without Landlock

    [rate_limit]                 # optional
    rate = 20.0                  # CREATE requests/s, sustained: 0 < rate <= 100000; default 20
    burst = 40                   # integer, 1-100000; default 40

    [connections]                # optional; only a shared (socket-activated) helper uses it
    per_user = 4                 # required in the table: helpers at once per peer uid, 1-1024
    lock_dir = "/run/privsock/users"  # default; an absolute, normalised path

    [[allow]]                    # zero or more
    transports = ["tcp"]         # required
    ports = [53, "8000-8080"]    # required
    addresses = ["0.0.0.0/0", "::/0"]  # required
    options = ["reuseaddr"]      # default []: "reuseaddr" (tcp only), "reuseport", "v6only"
    users = ["alice"]            # optional: only for these users (names)
    groups = ["web"]             # optional: only for members of these groups (names)

    [[deny]]                     # zero or more
    transports = ["tcp"]         # default ["udp", "tcp"]
    ports = [22]                 # required
    addresses = ["10.0.0.0/8"]   # default ["0.0.0.0/0", "::/0"]; no options key
    users = ["bob"]              # optional, as for allow
    groups = ["guests"]          # optional, as for allow

A rule with neither ``users`` nor ``groups`` applies to everyone; with either, to the
listed users and to members of the listed groups (policy.decide). Names are checked
here; privsock.helper.peernames resolves them to ids when the file is loaded.

Parsing is strict. Each of these is a PolicyError naming the key path and the problem:

* TOML syntax (with line and column); unknown keys (with the closest known key);
  wrong types (a boolean is not an integer, an integer is not a string, a table is
  not an array of tables); missing ``version`` or a version other than 1; missing
  required keys; empty arrays, except ``options = []`` (the default spelled out).
* Ports outside 1-65535; range strings other than ``"lo-hi"`` with lo <= hi (a
  single port is an integer, not ``"53"``); duplicate or overlapping ports.
* Addresses that are not an address or CIDR with a prefix length (no netmasks, no
  ``%zone``), have host bits set (``10.0.0.1/8``), repeat a network of the same
  rule, or are IPv4-mapped (``::ffff:0:0/96``): those would never match, as mapped
  requests are judged as IPv4. Networks may nest: loopback listed next to
  0.0.0.0/0 is redundant, not wrong.
* Unknown or repeated transport or option names (lower case only); ``v6only`` in a
  rule with no IPv6 network; ``options`` in a deny rule (deny ignores options); an
  option the rule's transports cannot be granted (policy.GRANTABLE): ``reuseaddr``
  in a rule for ``udp``, which would let a boss hijack another service's UDP port.
* ``users``/``groups`` that are empty, repeat a name, or hold a name that is not a
  portable POSIX name (``root`` is allowed there: it names a boss, not the helper).
* User or group names that are not portable POSIX names (``[A-Za-z_][A-Za-z0-9_.-]*``,
  at most 32 characters: no leading digit, so a name never reads as an id), and
  ``root`` as either. Only a name can be checked here: whoever resolves the names
  must also refuse uid 0 and gid 0.
* A policy with neither allow nor deny rules ("policy grants nothing"), and an allow
  rule that deny rules cover entirely, for each of its transports, ports and
  networks ("allow[1] can never match: deny[0] covers it"). A deny rule with users or
  groups counts there only for an allow rule whose users and groups it all lists.

Accepted although they look odd: a policy with only deny rules (it refuses
everything); rules that overlap other rules (two allow rules granting one port; a
deny rule for a port no allow rule grants, which is defence in depth); burst below
rate.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import posixpath
import re
import sys
import tomllib
from typing import Literal

from privsock.helper import jsontext
from privsock.helper.policy import (
    GRANTABLE,
    Connections,
    IPNetwork,
    Policy,
    RateLimit,
    Rule,
    covered,
    denies_some,
    port_pieces,
)
from privsock.helper.protocol import OPTION_NAMES, TRANSPORT_NAMES, Option, Transport

_DEFAULT_USER = "privsock"
_DEFAULT_RATE = 20.0
_DEFAULT_BURST = 40
_MAX_RATE = 100_000
_MAX_BURST = 100_000

_TOP_KEYS = ("version", "helper", "rate_limit", "connections", "allow", "deny")
_CONNECTION_KEYS = ("per_user", "lock_dir")
_DEFAULT_LOCK_DIR = "/run/privsock/users"
_MAX_PER_USER = 1024
_HELPER_KEYS = ("user", "group", "require_landlock")
_RATE_KEYS = ("rate", "burst")
_ALLOW_KEYS = ("transports", "ports", "addresses", "options", "users", "groups")
_DENY_KEYS = ("transports", "ports", "addresses", "users", "groups")

# Why an option is not in GRANTABLE for a transport, for the parser's message.
_NEVER_GRANTED = {
    ("reuseaddr", Transport.UDP): "on UDP, SO_REUSEADDR lets a socket take over a port "
    "that another service holds with SO_REUSEADDR (port hijack: the newest socket gets "
    "the traffic); give udp a rule of its own without reuseaddr",
}

_ANY_V4 = ipaddress.IPv4Network("0.0.0.0/0")
_ANY_V6 = ipaddress.IPv6Network("::/0")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

# Portable POSIX names; no leading digit (a numeric name reads as a uid), dot or hyphen.
_POSIX_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
# Five digits at most, so int() never meets a huge number; "1-100000" is not a range.
_PORT_RANGE = re.compile(r"([0-9]{1,5})-([0-9]{1,5})\Z")
_CIDR = re.compile(r"[0-9A-Fa-f:.]+(/[0-9]{1,3})?\Z")
_TOML_POSITION = re.compile(r"(.*) \(at (line \d+, column \d+|end of document)\)\Z", re.DOTALL)


class PolicyError(ValueError):
    """An invalid policy. ``str(e)`` is one line: ``<source>: <key path>: <problem>``."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{_one_line(source)}: {key}: {problem}")


class _Invalid(Exception):
    """A validation failure before the source is attached."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key = key
        self.problem = problem


# ---------------------------------------------------------------------------
# Parsing


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse and validate a policy; raises PolicyError and nothing else."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        found = _TOML_POSITION.match(str(e))
        if found is None:
            raise PolicyError(source, "document", f"invalid TOML: {_one_line(str(e))}") from None
        raise PolicyError(source, found[2], f"invalid TOML: {_one_line(found[1])}") from None
    except ValueError as e:  # int() refusing a number with thousands of digits
        why = _one_line(str(e))
        if "integer string conversion" in why:  # Python's wording names its own API
            why = f"a number has more than {sys.get_int_max_str_digits()} digits"
        raise PolicyError(source, "document", f"invalid TOML: {why}") from None
    except RecursionError:
        raise PolicyError(
            source, "document", "invalid TOML: arrays or tables nested too deeply"
        ) from None
    try:
        return _policy(document)
    except _Invalid as e:
        raise PolicyError(source, e.key, e.problem) from None


def _policy(document: dict[str, object]) -> Policy:
    if "version" not in document:
        raise _Invalid("version", "missing: a policy starts with version = 1")
    version = document["version"]
    if type(version) is not int:
        raise _Invalid("version", f"must be an integer, not {_kind(version)}")
    if version != 1:
        raise _Invalid("version", f"unsupported version {version}: this privsock reads version 1")
    _check_keys(document, "", _TOP_KEYS)

    helper = _table(document.get("helper", {}), "helper", _HELPER_KEYS)
    user = _posix_name(helper, "user", _DEFAULT_USER)
    group = _posix_name(helper, "group", user)
    require_landlock = helper.get("require_landlock", True)
    if not isinstance(require_landlock, bool):
        raise _Invalid(
            "helper.require_landlock", f"must be true or false, not {_kind(require_landlock)}"
        )
    limits = _table(document.get("rate_limit", {}), "rate_limit", _RATE_KEYS)
    rate_limit = RateLimit(_rate(limits), _burst(limits))
    allow = _rules(document, "allow")
    deny = _rules(document, "deny")
    if not allow and not deny:
        raise _Invalid(
            "document", "policy grants nothing: it has no [[allow]] and no [[deny]] rules"
        )
    for rule in allow:
        covering = _covering_denies(rule, [d for d in deny if _for_all_of(d, rule)])
        if covering:
            names = " and ".join(d.name for d in covering)
            verb = "covers" if len(covering) == 1 else "cover"
            raise _Invalid(rule.name, f"{rule.name} can never match: {names} {verb} it")
    connections = None
    if "connections" in document:
        connections = _connections(_table(document["connections"], "connections",
                                          _CONNECTION_KEYS))  # fmt: skip
    return Policy(user, group, rate_limit, allow, deny, require_landlock, connections)


def _connections(table: dict[str, object]) -> Connections:
    if "per_user" not in table:
        raise _Invalid("connections.per_user", "missing: [connections] needs it")
    per_user = _count(table["per_user"], "connections.per_user", _MAX_PER_USER)
    lock_dir = table.get("lock_dir", _DEFAULT_LOCK_DIR)
    if not isinstance(lock_dir, str):
        raise _Invalid("connections.lock_dir", f"must be a string, not {_kind(lock_dir)}")
    if (not lock_dir.startswith("/") or not lock_dir.isprintable()
            or posixpath.normpath(lock_dir) != lock_dir or lock_dir == "/"):  # fmt: skip
        raise _Invalid(
            "connections.lock_dir", f"{_show(lock_dir)} is not an absolute, normalised path"
        )
    return Connections(per_user, lock_dir)


def _table(value: object, key: str, known: tuple[str, ...]) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _Invalid(key, f"must be a table, not {_kind(value)}")
    _check_keys(value, key, known)
    return value


def _close_matches(word: str, known: tuple[str, ...]) -> list[str]:
    # Only a policy with a mistake gets here: the helper that starts does not
    # keep difflib in its memory.
    import difflib  # noqa: PLC0415

    return difflib.get_close_matches(word, known, n=1)


def _check_keys(table: dict[str, object], key: str, known: tuple[str, ...]) -> None:
    for name in table:
        if name in known:
            continue
        path = _join(key, name)
        if name == "options" and key.startswith("deny["):
            raise _Invalid(path, "a deny rule has no options: it matches whatever the options")
        close = _close_matches(name, known)
        hint = (
            f"did you mean {_show(close[0])}?" if close else "expected one of " + ", ".join(known)
        )
        raise _Invalid(path, f"unknown key {_show(name)} ({hint})")


def _posix_name(helper: dict[str, object], name: str, default: str) -> str:
    key = f"helper.{name}"
    value = helper.get(name, default)
    if not isinstance(value, str):
        raise _Invalid(key, f"must be a string, not {_kind(value)}")
    if not _POSIX_NAME.match(value):
        raise _Invalid(
            key,
            f"{_show(value)} is not a valid {name} name "
            "(letters, digits, _ . -; not starting with a digit, . or -; at most 32 characters)",
        )
    if value == "root":
        raise _Invalid(key, f'{name} "root" is not allowed: the helper must never keep root')
    return value


def _rate(limits: dict[str, object]) -> float:
    value = limits.get("rate", _DEFAULT_RATE)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid("rate_limit.rate", f"must be a number, not {_kind(value)}")
    if not (math.isfinite(value) and 0 < value <= _MAX_RATE):
        raise _Invalid("rate_limit.rate", f"{value!r} is outside 0 < rate <= {_MAX_RATE}")
    return float(value)


def _burst(limits: dict[str, object]) -> int:
    return _count(limits.get("burst", _DEFAULT_BURST), "rate_limit.burst", _MAX_BURST)


def _count(value: object, key: str, most: int) -> int:
    if type(value) is not int:
        raise _Invalid(key, f"must be an integer, not {_kind(value)}")
    if not 1 <= value <= most:
        raise _Invalid(key, f"{value} is outside 1-{most}")
    return value


def _rules(document: dict[str, object], kind: Literal["allow", "deny"]) -> tuple[Rule, ...]:
    if kind not in document:
        return ()
    value = document[kind]
    if not isinstance(value, list):
        raise _Invalid(kind, f"must be an array of tables ([[{kind}]]), not {_kind(value)}")
    if not value:
        raise _Invalid(kind, f"must not be empty: add [[{kind}]] tables or leave it out")
    return tuple(_rule(table, kind, index) for index, table in enumerate(value))


def _rule(table: object, kind: Literal["allow", "deny"], index: int) -> Rule:
    key = f"{kind}[{index}]"
    rule = _table(table, key, _ALLOW_KEYS if kind == "allow" else _DENY_KEYS)
    for required in ("transports", "ports", "addresses") if kind == "allow" else ("ports",):
        if required not in rule:
            raise _Invalid(_join(key, required), f"missing: every [[{kind}]] rule needs it")
    transports = (
        _transports(rule["transports"], f"{key}.transports")
        if "transports" in rule
        else frozenset(Transport)
    )
    ports = _ports(rule["ports"], f"{key}.ports")
    networks = (
        _networks(rule["addresses"], f"{key}.addresses")
        if "addresses" in rule
        else (_ANY_V4, _ANY_V6)
    )
    options = Option(0)
    if "options" in rule:
        options = _options(rule["options"], f"{key}.options", transports, networks)
    users = _who(rule, key, "users")
    groups = _who(rule, key, "groups")
    return Rule(index, kind, transports, ports, networks, options, users, groups)


def _who(rule: dict[str, object], key: str, name: str) -> tuple[str, ...]:
    """A rule's ``users`` or ``groups``: distinct portable names, in file order."""
    if name not in rule:
        return ()
    path = f"{key}.{name}"
    seen: dict[str, int] = {}
    for i, item in enumerate(_array(rule[name], path)):
        if not isinstance(item, str):
            raise _Invalid(f"{path}[{i}]", f"must be a string, not {_kind(item)}")
        if not _POSIX_NAME.match(item):
            raise _Invalid(
                f"{path}[{i}]",
                f"{_show(item)} is not a valid {name[:-1]} name (letters, digits, _ . -; "
                "not starting with a digit, . or -; at most 32 characters)",
            )
        if item in seen:
            raise _Invalid(f"{path}[{i}]", f"duplicate {_show(item)} (also {path}[{seen[item]}])")
        seen[item] = i
    return tuple(seen)


def _for_all_of(deny: Rule, allow: Rule) -> bool:
    """Whether ``deny`` applies to everyone ``allow`` applies to, whatever the
    group memberships: only then can it make ``allow`` useless."""
    if not deny.users and not deny.groups:
        return True
    if not allow.users and not allow.groups:
        return False
    return set(allow.users) <= set(deny.users) and set(allow.groups) <= set(deny.groups)


def _array(value: object, key: str, *, may_be_empty: bool = False) -> list[object]:
    if not isinstance(value, list):
        raise _Invalid(key, f"must be an array, not {_kind(value)}")
    if not value and not may_be_empty:
        raise _Invalid(key, "must not be empty")
    return value


def _names(
    value: object, key: str, known: tuple[str, ...], what: str, *, may_be_empty: bool = False
) -> list[str]:
    """Strings from ``known``, each at most once, in file order."""
    seen: dict[str, int] = {}
    items = _array(value, key, may_be_empty=may_be_empty)
    for i, item in enumerate(items):
        path = f"{key}[{i}]"
        if not isinstance(item, str):
            raise _Invalid(path, f"must be a string, not {_kind(item)}")
        if item not in known:
            close = _close_matches(item.lower(), known)
            hint = f"did you mean {_show(close[0])}?" if close else "expected " + ", ".join(known)
            raise _Invalid(path, f"unknown {what} {_show(item)} ({hint})")
        if item in seen:
            raise _Invalid(path, f"duplicate {what} {_show(item)} (also {key}[{seen[item]}])")
        seen[item] = i
    return list(seen)


def _transports(value: object, key: str) -> frozenset[Transport]:
    names = _names(value, key, tuple(TRANSPORT_NAMES), "transport")
    return frozenset(TRANSPORT_NAMES[n] for n in names)


def _options(
    value: object, key: str, transports: frozenset[Transport], networks: tuple[IPNetwork, ...]
) -> Option:
    names = _names(value, key, tuple(OPTION_NAMES), "option", may_be_empty=True)
    if "v6only" in names and not any(n.version == 6 for n in networks):
        raise _Invalid(
            f"{key}[{names.index('v6only')}]",
            "v6only needs an IPv6 network in addresses; this rule has only IPv4 ones",
        )
    for name in names:
        for transport in sorted(transports):
            if not OPTION_NAMES[name] & GRANTABLE[transport]:
                raise _Invalid(
                    f"{key}[{names.index(name)}]",
                    f"{name} is never granted for {transport.name.lower()}: "
                    f"{_NEVER_GRANTED.get((name, transport), 'it is not safe to grant')}",
                )
    options = Option(0)
    for name in names:
        options |= OPTION_NAMES[name]
    return options


def _ports(value: object, key: str) -> tuple[tuple[int, int], ...]:
    ranges = [_port_range(item, f"{key}[{i}]") for i, item in enumerate(_array(value, key))]
    # After sorting by start, any overlap shows up between neighbours.
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    for a, b in itertools.pairwise(order):
        if ranges[b][0] <= ranges[a][1]:
            first, later = min(a, b), max(a, b)
            what = "duplicates" if ranges[a] == ranges[b] else "overlaps"
            shown = f"{show_range(ranges[later])} {what} {show_range(ranges[first])}"
            raise _Invalid(f"{key}[{later}]", f"{shown} ({key}[{first}])")
    return tuple(ranges)


def _port_range(item: object, key: str) -> tuple[int, int]:
    if isinstance(item, str):
        found = _PORT_RANGE.match(item)
        if found is None:
            if item.isdecimal():
                raise _Invalid(key, f"write a single port as an integer ({item}), not a string")
            raise _Invalid(key, f'{_show(item)} is not a "lo-hi" port range such as "8000-8080"')
        low, high = int(found[1]), int(found[2])
        _check_port(low, key)
        _check_port(high, key)
        if low > high:
            raise _Invalid(key, f'range "{low}-{high}" is reversed (write "{high}-{low}")')
        return low, high
    if type(item) is not int:
        raise _Invalid(key, f'must be an integer or a "lo-hi" string, not {_kind(item)}')
    _check_port(item, key)
    return item, item


def _check_port(port: int, key: str) -> None:
    if not 1 <= port <= 65535:
        raise _Invalid(key, f"port {port} is outside 1-65535")


def _networks(value: object, key: str) -> tuple[IPNetwork, ...]:
    # Nested networks are accepted (loopback listed next to 0.0.0.0/0 reads well and
    # changes nothing); the same network twice is a mistake.
    seen: dict[IPNetwork, int] = {}
    for i, item in enumerate(_array(value, key)):
        network = _network(item, f"{key}[{i}]")
        if network in seen:
            raise _Invalid(
                f"{key}[{i}]", f"{_show(str(item))} duplicates {key}[{seen[network]}] ({network})"
            )
        seen[network] = i
    return tuple(seen)


def _network(item: object, key: str) -> IPNetwork:
    if not isinstance(item, str):
        raise _Invalid(key, f"must be a string, not {_kind(item)}")
    if "%" in item:
        raise _Invalid(key, f"{_show(item)}: scoped addresses (%zone) are not supported")
    if not _CIDR.match(item):
        raise _Invalid(key, f"{_show(item)} is not an address or CIDR such as 10.0.0.0/8")
    try:
        network = ipaddress.ip_network(item, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise _Invalid(key, f"{_show(item)} is not a valid IPv4 or IPv6 network") from None
        raise _Invalid(key, f"{_show(item)} has host bits set (did you mean {loose}?)") from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        v4 = ipaddress.IPv4Network(
            (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
        )
        raise _Invalid(
            key,
            f"IPv4-mapped {_show(item)} would never match: mapped requests are judged as "
            f"IPv4; write {v4}",
        )
    return network


def _covering_denies(rule: Rule, deny: list[Rule]) -> list[Rule]:
    """The deny rules that together refuse everything ``rule`` allows, or [] if any of
    it gets through."""
    used: set[int] = set()
    for transport in rule.transports:
        denies = [d for d in deny if transport in d.transports]
        for low, high in rule.ports:
            for _, _, over in port_pieces(low, high, denies):
                for network in rule.networks:
                    if not covered(network, [n for d in over for n in d.networks]):
                        return []
                    used.update(d.position for d in over if denies_some(d, network))
    return [d for d in deny if d.position in used]


# ---------------------------------------------------------------------------
# Message helpers: values from the file are quoted and cut, so a message stays one line.


def _show(value: str) -> str:
    text = jsontext.string(value)  # ASCII only: escapes newlines and every other separator
    return text if len(text) <= 40 else text[:36] + '..."'


def show_range(ports: tuple[int, int]) -> str:
    low, high = ports
    return str(low) if low == high else f"{low}-{high}"


def _one_line(text: str) -> str:
    return text if text.isprintable() else jsontext.string(text)


def _join(key: str, name: str) -> str:
    shown = name if _BARE_KEY.match(name) else _show(name)
    return f"{key}.{shown}" if key else shown


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"
