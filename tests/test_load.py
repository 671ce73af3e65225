"""Load: 100,000 requests through SocketCreator to a real helper, then the rate
limit counted against time.

Throughput and latency are printed (`pytest -s tests/test_load.py`), never
asserted: this machine is shared and noisy, and bench/ owns performance. What
is asserted holds at any speed: every request answered as the policy says, no
fd and no RSS growth in the helper, no fd growth in the boss, and grants within
one token of the theoretical bucket (fuzz/model.py BucketCheck)."""

from __future__ import annotations

import array
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fuzz import expected, live, livehelper, model
from privsock.client import SocketCreator
from privsock.errors import CreatorOSError, PolicyDenied, RateLimited
from privsock.helper.protocol import Stage

from .test_faults import granted as create_granted

pytestmark = [pytest.mark.root, pytest.mark.slow]

REQUESTS = 100_000
WARM_UP = 5_000
BOUND = 30.0
# (transport, address, port): allowed ones, and every tenth denied (deny[0]).
ALLOWED = [(t, a, p) for t in ("udp", "tcp") for a in ("127.0.0.1", "::1")
           for p in (53, 80, 1000, 1001, 1002)]  # fmt: skip
DENIED = ("tcp", "127.0.0.1", 22)


def _boss_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _percentile(sorted_ns: list[float], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0


def test_100000_requests_flat_fds_and_rss(
    root: None, policy_factory: Callable[[str], Path]
) -> None:
    policy = policy_factory(expected.policy_text())  # rate 100000/s, burst 100000
    latencies = array.array("d", bytes(8 * REQUESTS))
    granted = denied = refused_sends = 0
    rss: list[int] = []
    with SocketCreator(str(policy), helper_argv=livehelper.netns_argv(), audit_sink=None,
                       reply_timeout=BOUND) as c:  # fmt: skip
        helper = c.pid
        assert helper is not None
        for i in range(WARM_UP):
            c.create(*ALLOWED[i % len(ALLOWED)]).close()
        c.ping()  # idle: the last granted socket is closed
        boss_fds = _boss_fds()
        helper_fds = livehelper.fd_count(helper)
        rss.append(livehelper.rss_kib(helper))
        clock = time.perf_counter_ns
        started = time.perf_counter()
        for i in range(REQUESTS):
            t0 = clock()
            if i % 10 == 9:
                try:
                    c.create(*DENIED)
                except PolicyDenied:
                    denied += 1
            else:
                sock, tries = create_granted(c, *ALLOWED[i % len(ALLOWED)])
                sock.close()
                granted += 1
                refused_sends += tries - 1
            latencies[i] = clock() - t0
            if i % 10_000 == 9_999:
                rss.append(livehelper.rss_kib(helper))
        elapsed = time.perf_counter() - started
        c.ping()
        assert c.pid == helper  # one helper served it all
        assert livehelper.fd_count(helper) == helper_fds == 2
        assert _boss_fds() == boss_fds
    ordered = sorted(latencies)
    print(
        f"\nload: {REQUESTS:,} requests ({granted:,} granted, {denied:,} denied) in "
        f"{elapsed:.1f}s: {REQUESTS / elapsed:,.0f} requests/s; latency p50 "
        f"{_percentile(ordered, 0.50):.0f} us, p99 {_percentile(ordered, 0.99):.0f} us, "
        f"max {ordered[-1] / 1000:.0f} us; helper RSS KiB {rss}; helper fds {helper_fds}; "
        f"fd sends refused by the kernel (user budget in flight) {refused_sends}"
    )
    assert (granted, denied) == (REQUESTS * 9 // 10, REQUESTS // 10)
    assert max(rss) - rss[0] <= live.RSS_SLACK_KIB, rss


RATE, BURST = 500.0, 50
PACED = 500  # requests at the policy's rate: one second
HAMMER_SECONDS = 2.0


def test_rate_limit_within_one_token_of_the_bucket(
    root: None, policy_factory: Callable[[str], Path]
) -> None:
    policy = policy_factory(expected.policy_text(RATE, BURST))
    events: list[tuple[float, float, bool]] = []
    check = model.BucketCheck(RATE, BURST, time.monotonic())  # before the bucket exists
    with SocketCreator(str(policy), helper_argv=livehelper.netns_argv(), audit_sink=None,
                       reply_timeout=BOUND) as c:  # fmt: skip

        def ask() -> bool:
            t0 = time.monotonic()
            try:
                c.create("udp", "127.0.0.1", 53).close()
                granted = True
            except RateLimited as exc:
                assert 0 < exc.retry_after <= 1.0 / RATE + 0.001
                granted = False
            except CreatorOSError as exc:  # a token was taken; the fd could not be passed
                if exc.stage is not Stage.SEND:
                    raise
                granted = True
            events.append((t0, time.monotonic(), granted))
            return granted

        # At the policy's rate: a request only once a whole token has come back
        # since the last reply (plus 0.1%, for the float in the helper). None is refused.
        paced = 0
        for _ in range(PACED):
            paced += ask()
            until = events[-1][1] + 1.001 / RATE
            while time.monotonic() < until:
                time.sleep(max(0.0, until - time.monotonic()))
        # Idle for longer than a full bucket takes to fill: no more than burst banks.
        time.sleep(2.0 * BURST / RATE)
        # As fast as we can: the bucket is the only limit.
        end = time.monotonic() + HAMMER_SECONDS
        while time.monotonic() < end:
            ask()
        # Wait two tokens' time: a valid request succeeds again.
        time.sleep(2.0 / RATE)
        assert ask()
    check.run(events)
    span = events[-1][1] - events[0][0]
    print(
        f"\nrate limit {RATE:g}/s burst {BURST}: paced {paced}/{PACED} granted; then "
        f"{check.grants} grants and {check.refusals} refusals over {span:.2f}s "
        f"(at most {BURST + RATE * span:.0f}: a full bucket plus rate x time); "
        f"{check.upper_checks} upper and {check.lower_checks} lower bound checks over "
        f"{check.lower_span:.2f}s"
    )
    assert paced == PACED
    assert check.over == [] and check.under == []
    assert check.refusals > 0 and check.lower_checks > 0
