"""Seed corpora for the fuzz targets, taken from the tests and the shipped policies.

    python fuzz/seeds.py        # (re)writes fuzz/corpus/<target>/, one file per seed

Files are named by the SHA-1 of their content, so writing twice changes nothing.
fuzz/run.py calls write() before every run, so new test cases become seeds.
"""

from __future__ import annotations

import hashlib
import ipaddress
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from privsock.helper import protocol  # noqa: E402
from privsock.helper.policy import Policy, Rule  # noqa: E402
from tests import conftest  # noqa: E402
from tests import test_helper_e2e as e2e  # noqa: E402
from tests import test_policy as tpol  # noqa: E402
from tests import test_protocol as tp  # noqa: E402


def protocol_seeds() -> Iterable[bytes]:
    yield from (tp.VALID_V4, tp.VALID_V6, tp.VALID_PING)
    for _reply, wire in tp.REPLY_CASES:
        yield wire
    for transport, address, options in tp.CREATE_CASES:
        yield protocol.encode_request(protocol.Create(tp.RID, transport, address, 53, options))
    yield from e2e.MALFORMED
    yield from e2e._mutations()


def policy_parser_seeds() -> Iterable[bytes]:
    for path in sorted((ROOT / "policy").rglob("*.toml")):
        yield path.read_bytes()
    yield conftest.TEST_POLICY.encode()
    for case in tpol.ERRORS:
        texts = [v for v in case if isinstance(v, str) and "\n" in v]
        yield from (t.encode() for t in texts[:1] if len(t) < 4096)
    yield ("version = 1\n" + "\n".join(tpol.SNIPPETS)).encode()


def _encode_rule(rule: Rule) -> bytes:
    """A rule in the byte layout targets._rule reads."""
    out = bytearray([sum(rule.transports) - 1, min(len(rule.ports), 3) - 1])
    for low, high in rule.ports[:3]:
        out += low.to_bytes(2, "big") + min(high - low, 1023).to_bytes(2, "big")
    out.append(min(len(rule.networks), 3) - 1)
    for network in rule.networks[:3]:
        out.append((0x80 if network.version == 6 else 0) | network.prefixlen)
        out += network.network_address.packed
    if rule.kind == "allow":
        out.append(int(rule.options))
    return bytes(out)


def decide_input(policy: Policy, transport: int, address: object, port: int, options: int) -> bytes:
    """One targets.decide_target input: the policy's rules, then the request."""
    assert isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address)
    out = bytearray([len(policy.allow), len(policy.deny)])
    for rule in (*policy.allow, *policy.deny):
        out += _encode_rule(rule)
    out += bytes([transport - 1, address.version == 6]) + address.packed
    out += bytes([0]) + port.to_bytes(2, "big") + bytes([options])
    return bytes(out)


def policy_decide_seeds() -> Iterable[bytes]:
    for case in tpol.DECISIONS:
        _name, transport, address, port, options = case[:5]
        yield decide_input(tpol.TABLE_POLICY, transport, ipaddress.ip_address(address),
                           port, int(options))  # fmt: skip


SEEDS = {
    "protocol": protocol_seeds,
    "policy_parser": policy_parser_seeds,
    "policy_decide": policy_decide_seeds,
}


def write() -> dict[str, int]:
    """Write every seed; returns how many seeds each target has."""
    counts = {}
    for target, seeds in SEEDS.items():
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        names = set()
        for seed in seeds():
            name = hashlib.sha1(seed).hexdigest()  # noqa: S324 (a name, not a signature)
            names.add(name)
            path = directory / name
            if not path.exists():
                path.write_bytes(seed)
        counts[target] = len(names)
    return counts


if __name__ == "__main__":
    for target, count in write().items():
        print(f"{target}: {count} seeds in {CORPUS / target}")
