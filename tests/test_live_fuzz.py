"""The live-helper fuzzer (fuzz/live.py) against a real hardened helper.

The normal test run sends at least 50,000 datagrams; `make fuzz` runs the same
fuzzer for FUZZ_SECONDS. LIVE_FUZZ_SEED=<n> repeats a run's stream (each run
prints its seed)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuzz import datagrams, expected, live, livehelper, model
from fuzz.model import DENIED, MALFORMED, OK, OS_ERROR, STAGE_BIND, TCP, UDP

pytestmark = pytest.mark.root

PORT, ADDRESS, TRANSPORT, OPTION = (model.REASON_PORT, model.REASON_ADDRESS,
                                    model.REASON_TRANSPORT, model.REASON_OPTION)  # fmt: skip
RA, RP, V6 = model.REUSEADDR, model.REUSEPORT, model.V6ONLY

# Worked out by hand from the policy text in fuzz/expected.py, not from the model:
# (transport, address, port, options) -> (status, detail, code)
HAND_CASES = [
    (UDP, "127.0.0.1", 53, 0, (OK, 0, 0)),
    (TCP, "127.9.9.9", 1010, RA | RP, (OK, 0, 0)),
    (UDP, "::1", 80, V6, (OK, 0, 0)),
    (TCP, "::", 1000, 0, (OK, 0, 0)),  # dual-stack: both wildcards are allowed
    (UDP, "::ffff:0.0.0.0", 1000, 0, (OK, 0, 0)),  # judged as 0.0.0.0
    (TCP, "127.0.0.1", 8080, 0, (OK, 0, 0)),
    (TCP, "127.0.0.53", 53, 0, (DENIED, 0, PORT)),  # deny[1]
    (TCP, "0.0.0.0", 53, 0, (DENIED, 0, PORT)),  # the wildcard captures 127.0.0.53
    (TCP, "::", 53, 0, (DENIED, 0, PORT)),  # dual-stack :: receives IPv4 too
    (TCP, "::", 53, V6, (OK, 0, 0)),  # v6-only :: does not
    (UDP, "0.0.0.0", 53, 0, (OK, 0, 0)),  # deny[1] is tcp only
    (UDP, "::1", 1005, 0, (DENIED, 0, PORT)),  # deny[0], inside allow[0]'s range
    (TCP, "127.0.0.1", 22, 0, (DENIED, 0, PORT)),
    (UDP, "127.0.0.1", 7, 0, (DENIED, 0, PORT)),  # no rule has the port
    (TCP, "192.0.2.7", 443, 0, (DENIED, 0, TRANSPORT)),
    (UDP, "10.0.0.1", 53, 0, (DENIED, 0, ADDRESS)),
    (UDP, "192.0.2.7", 443, RP, (DENIED, 0, OPTION)),
    (TCP, "127.0.0.1", 8080, RA, (DENIED, 0, OPTION)),
    (TCP, "127.0.0.2", 8080, 0, (DENIED, 0, ADDRESS)),
    (UDP, "127.0.0.1", 8080, 0, (DENIED, 0, TRANSPORT)),
    (UDP, "224.0.0.1", 53, 0, (DENIED, 0, ADDRESS)),
    (UDP, "192.0.2.7", 443, 0, (OS_ERROR, errno.EADDRNOTAVAIL, STAGE_BIND)),
    (UDP, "127.0.0.1", 53, RA, (DENIED, 0, OPTION)),  # never for udp: port hijack
    (UDP, "0.0.0.0", 1000, RP, (OK, 0, 0)),
    (UDP, "2001:db8::1", 5353, 0, (OS_ERROR, errno.EADDRNOTAVAIL, STAGE_BIND)),
    (UDP, "::ffff:192.0.2.7", 443, 0, (OS_ERROR, errno.EADDRNOTAVAIL, STAGE_BIND)),
    (TCP, "::ffff:127.0.0.1", 80, V6, (OS_ERROR, errno.EINVAL, STAGE_BIND)),
    (TCP, "::ffff:127.0.0.1", 80, 0, (OK, 0, 0)),
]


def _request(rid: int, transport: int, address: str, port: int, options: int) -> bytes:
    family, value = model.parse_address(address)
    return datagrams.encode(model.CREATE, rid, transport, family, port, value, options)


@pytest.fixture
def helper(root: None, tmp_path: Path) -> Iterator[livehelper.LiveHelper]:
    figures = live.Figures()
    policy = live.write_policy(tmp_path, "live.toml", expected.policy_text())
    started = live.start(policy, livehelper.netns_argv(), figures)
    yield started
    assert started.end() == 0


def test_hand_written_cases_agree_with_the_model_and_the_helper(
    helper: livehelper.LiveHelper,
) -> None:
    figures = live.Figures()
    for rid, (transport, address, port, options, (status, detail, code)) in enumerate(HAND_CASES):
        data = _request(rid, transport, address, port, options)
        want = expected.expect(data, with_fds=False)
        assert (want.status, want.detail, want.code) == (status, detail, code), HAND_CASES[rid]
        live.one(helper, data, [], False, figures)
        assert figures.mismatches == [], HAND_CASES[rid]
    assert figures.statuses["OK"] == sum(1 for c in HAND_CASES if c[4][0] == OK)
    assert figures.granted_checked == figures.statuses["OK"]
    # And a request carrying an fd is MALFORMED whatever it asks for.
    r, w = os.pipe()
    try:
        request = _request(99, UDP, "127.0.0.1", 53, 0)
        assert expected.expect(request, with_fds=True).status == MALFORMED
        live.one(helper, _request(99, UDP, "127.0.0.1", 53, 0), [r, w], True, figures)
        assert figures.mismatches == [] and figures.statuses["MALFORMED"] == 1
    finally:
        os.close(r)
        os.close(w)


def test_a_create_sent_before_the_last_reply_was_read_waits(
    helper: livehelper.LiveHelper,
) -> None:
    figures = live.Figures()
    first = _request(1, UDP, "127.0.0.1", 53, 0)
    second = _request(2, UDP, "127.0.0.1", 80, 0)
    # PROTOCOL.md: refused with a retry-after of 1 ms, and no token taken.
    want = expected.Expected(model.RATE_LIMITED, 2, 1, 0)
    assert expected.expect(second, False, unread=True) == want
    live.pipelined(helper, (first, [], False), (second, [], False), figures)
    assert figures.mismatches == []
    assert figures.statuses == {"OK": 1, "RATE_LIMITED": 1}
    live.one(helper, second, [], False, figures)  # once the reply is read, it is served
    assert figures.mismatches == [] and figures.statuses["OK"] == 2


@pytest.mark.slow
def test_live_helper_survives_50000_hostile_datagrams(root: None) -> None:
    seed = int(os.environ["LIVE_FUZZ_SEED"]) if "LIVE_FUZZ_SEED" in os.environ else None
    figures = live.run(datagrams=live.MIN_DATAGRAMS, seed=seed, echo=print)
    print(figures.summary())
    assert figures.mismatches == []
    assert figures.datagrams >= live.MIN_DATAGRAMS
    # Nothing lost: one reply and one audit line for every datagram (and one more
    # for a grant whose fd the kernel refused: another process of the helper's
    # user may hold its budget of fds in flight for a moment; PROTOCOL.md).
    assert figures.replies == figures.datagrams
    assert figures.audit_lines == figures.datagrams + figures.send_refused
    # Both helpers served to the end and left at the documented end of session.
    assert figures.helpers == figures.clean_ends == 2
    assert figures.with_fds > 5_000 and figures.with_creds > 2_000 and figures.pipelined > 300
    assert figures.granted_checked > 1_000  # every granted socket was inspected
    assert {"DENIED", "MALFORMED", "OS_ERROR", "RATE_LIMITED"} <= set(figures.statuses)
    # Flat after warm-up: exactly the two idle fds, and no RSS growth beyond the slack.
    assert len(figures.fd_samples) >= 10 and set(figures.fd_samples) == {2}
    assert figures.rss_growth_kib <= live.RSS_SLACK_KIB, figures.rss_samples
    bucket = figures.bucket
    assert bucket is not None
    assert bucket.over == [] and bucket.under == []
    assert bucket.lower_checks > 0 and bucket.refusals > 0
    assert figures.after_limit_ok
