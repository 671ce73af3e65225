"""In-process cost of each step of the helper's request path: before and after.

    .venv/bin/python bench/steps.py [--rounds N] [--calls N]

"Before" is tests/legacy_helper.py: the previous decoder and decide, kept
verbatim as the oracle the property tests hold the current code
to; for the audit line, the previous encoder (a dict through json.dumps),
which the boss keeps as privsock.auditjson. "After" is privsock.helper as it
is, called as serve.Session calls it (decide's rules precomputed once per
session). Both run in this one process,
side by side: each round times every step on both sides in a shuffled order,
a step's figure is the median of its rounds, and the ratio (before / after) is
taken round by round. Nothing here needs root or the network. Like the rest
of bench/, only the ratios carry over between machines.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import random
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from privsock import auditjson
from privsock.helper import auditrecord, protocol
from privsock.helper.policy import Peer, judge, rules_for
from privsock.helper.policyparse import parse_policy
from privsock.helper.protocol import Create, Option, Transport
from tests import legacy_helper

REPO = Path(__file__).resolve().parent.parent
PEER = Peer(uid=1000, gid=1000, pid=4242, groups=frozenset({1000}))
V4 = Create(7, Transport.UDP, ipaddress.IPv4Address("127.0.0.1"), 53, Option(0))
V6 = Create(7, Transport.TCP, ipaddress.IPv6Address("::1"), 53, Option.V6ONLY)
MALFORMED_REASON = "bad magic b'\\x00\"'"

Step = tuple[str, Callable[[], object], Callable[[], object]]


def _audit(
    name: str, req: Create | None, decision: str, **kw: object
) -> tuple[str, Callable[[], object], Callable[[], object]]:
    args = dict(side="helper", pid=4242, request_id=7, request=req, decision=decision,
                peer_uid=1000, peer_pid=4242, **kw)  # fmt: skip

    def before() -> object:
        return auditjson.encode(auditjson.record(now=time.time(), **args))  # type: ignore[arg-type]

    # As serve.Session writes it: one Lines per session, made once.
    lines = auditrecord.Lines(side="helper", pid=4242, peer_uid=1000, peer_pid=4242)

    def after() -> object:
        return lines.line(time.time(), 7, req, decision, **kw)  # type: ignore[arg-type]

    return name, before, after


def steps() -> list[Step]:
    out: list[Step] = [
        _audit("audit line, granted, IPv6", V6, "granted", rule="allow[1]"),
        _audit("audit line, granted, IPv4", V4, "granted", rule="allow[0]"),
        _audit("audit line, malformed", None, "malformed", reason=MALFORMED_REASON),
    ]  # fmt: skip
    for name, req in (("IPv6", V6), ("IPv4", V4)):
        data = protocol.encode_request(req)
        out.append((f"decode_request, CREATE {name}",
                    functools.partial(legacy_helper.decode_request, data),
                    functools.partial(protocol.decode_request, data)))  # fmt: skip
    for label, path in (("default policy", "policy/default.toml"),
                        ("bench policy", "policy/examples/bench.toml")):  # fmt: skip
        policy = parse_policy((REPO / path).read_text(), path)
        rules = rules_for(policy, PEER)
        port = 53 if label == "default policy" else 900
        for name, base in (("IPv6", V6), ("IPv4", V4)):
            req = Create(base.request_id, base.transport, base.address, port, base.options)
            out.append((f"decide, {label}, {name}",
                        functools.partial(legacy_helper.decide, policy, req, PEER),
                        functools.partial(judge, rules, req)))  # fmt: skip
    return out


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    return timeit.Timer(fn).timeit(number=calls) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5000, help="calls per step per round")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    table = steps()
    for _, before, after in table:  # warm (tests/ hold the two sides to the same results)
        before()
        after()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in table}
    rng = random.Random(args.seed)  # noqa: S311 (an order, not a secret)
    for r in range(args.rounds):
        order = [(name, side, fn) for name, before, after in table
                 for side, fn in ((0, before), (1, after))]  # fmt: skip
        rng.shuffle(order)
        got: dict[tuple[str, int], float] = {}
        for name, side, fn in order:
            got[name, side] = per_call_us(fn, args.calls)
        for name, pairs in samples.items():
            pairs.append((got[name, 0], got[name, 1]))
        print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    head = f"step ({args.rounds} rounds x {args.calls} calls)"
    print(f"| {head} | before µs | after µs | before/after |")
    print("|---|---|---|---|")
    for name, pairs in samples.items():
        old = statistics.median(b for b, _ in pairs)
        new = statistics.median(a for _, a in pairs)
        ratio = statistics.median(b / a for b, a in pairs)
        print(f"| {name} | {old:.2f} | {new:.2f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
