"""The token bucket (privsock.helper.ratelimit): pure arithmetic on a clock we pass in.

Times and rates are chosen so the float arithmetic is exact where a test asserts
an exact millisecond boundary: rates that are powers of two make 1/rate and
ms/1000 * rate exact, and a fractional-rate case is chosen far from any integer.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from privsock.helper.ratelimit import TokenBucket


def drain(bucket: TokenBucket, now: float) -> None:
    while bucket.take(now) == 0:
        pass


@pytest.mark.parametrize("burst", [1, 2, 5, 100])
@pytest.mark.parametrize("t0", [0.0, 1000.0, 1e6])
def test_starts_full_and_takes_burst(burst: int, t0: float) -> None:
    bucket = TokenBucket(rate=8.0, burst=burst, now=t0)
    assert bucket.tokens(t0) == burst
    for _ in range(burst):
        assert bucket.take(t0) == 0
    assert bucket.tokens(t0) == 0
    retry = bucket.take(t0)
    assert retry > 0
    # A refused take consumes nothing and keeps refusing at the same instant.
    assert bucket.take(t0) == retry
    assert bucket.tokens(t0) == 0


@pytest.mark.parametrize(
    ("rate", "expected_ms"),
    [(8.0, 125), (4.0, 250), (1.0, 1000), (0.5, 2000), (1024.0, 1), (2.0**20, 1)],
)
@pytest.mark.parametrize("t0", [0.0, 4096.0])
def test_retry_after_is_exact_when_empty(rate: float, expected_ms: int, t0: float) -> None:
    bucket = TokenBucket(rate=rate, burst=1, now=t0)
    assert bucket.take(t0) == 0
    assert bucket.take(t0) == expected_ms
    # expected_ms - 1 ms is one token's worth short (skip when that is < 1 ms).
    if expected_ms > 1:
        assert bucket.take(t0 + (expected_ms - 1) / 1000) > 0
    assert bucket.take(t0 + expected_ms / 1000) == 0
    assert bucket.take(t0 + expected_ms / 1000) > 0


def test_retry_after_rounds_up() -> None:
    # rate 3: one token takes 333.33... ms, reported as 334; 333 ms gives 0.999 tokens.
    bucket = TokenBucket(rate=3.0, burst=1, now=0.0)
    assert bucket.take(0.0) == 0
    assert bucket.take(0.0) == 334
    assert bucket.take(0.333) == 1  # 0.999 tokens: 1/3 ms short, rounded up to 1
    assert bucket.take(0.334) == 0


def test_retry_after_counts_partial_tokens() -> None:
    # rate 2/s: after 250 ms half a token is there, so 250 ms remain, not 500.
    bucket = TokenBucket(rate=2.0, burst=1, now=0.0)
    assert bucket.take(0.0) == 0
    assert bucket.take(0.25) == 250
    assert bucket.take(0.499) > 0
    assert bucket.take(0.5) == 0


def test_retry_after_is_at_least_one_ms() -> None:
    # 1e6 tokens/s: a token is 1 us away, still reported as 1 ms, never 0 (0 means granted).
    bucket = TokenBucket(rate=1e6, burst=1, now=0.0)
    assert bucket.take(0.0) == 0
    assert bucket.take(0.0) == 1


def test_slow_rate_retry() -> None:
    # One token per 4096 s (a power of two, so every step below is exact float
    # arithmetic; 1/3600 would make the 1000 ms case come out as 1000.0000000001).
    bucket = TokenBucket(rate=1 / 4096, burst=1, now=0.0)
    assert bucket.take(0.0) == 0
    assert bucket.take(0.0) == 4_096_000
    assert bucket.take(2048.0) == 2_048_000
    assert bucket.take(4095.0) == 1000
    assert bucket.take(4095.5) == 500
    assert bucket.take(4096.0) == 0


def test_refill_caps_at_burst() -> None:
    bucket = TokenBucket(rate=8.0, burst=3, now=0.0)
    drain(bucket, 0.0)
    assert bucket.tokens(0.25) == 2.0
    assert bucket.tokens(100.0) == 3.0
    assert bucket.tokens(1e9) == 3.0
    for _ in range(3):
        assert bucket.take(1e9) == 0
    assert bucket.take(1e9) > 0


def test_idle_time_does_not_bank_beyond_burst() -> None:
    """A long idle period followed by a flood still gets only burst at once."""
    bucket = TokenBucket(rate=1.0, burst=4, now=0.0)
    granted = sum(bucket.take(10_000.0) == 0 for _ in range(100))
    assert granted == 4


def test_backwards_clock_mints_nothing() -> None:
    bucket = TokenBucket(rate=8.0, burst=2, now=100.0)
    drain(bucket, 100.0)
    # Stepping back and forth below the high-water mark must not add tokens.
    for t in (50.0, 0.0, 99.0, 99.999, -1e9, 100.0):
        assert bucket.take(t) > 0
        assert bucket.tokens(t) == 0.0
    # Only time past the previous maximum counts: 125 ms after 100.0.
    assert bucket.take(100.125) == 0
    assert bucket.take(100.125) > 0


def test_backwards_clock_after_forward_step_counts_from_high_water_mark() -> None:
    bucket = TokenBucket(rate=4.0, burst=1, now=0.0)
    assert bucket.take(0.0) == 0
    assert bucket.take(0.125) == 125  # half a token
    assert bucket.take(0.0) == 125  # going back changes nothing
    assert bucket.take(0.25) == 0  # 250 ms after 0.0, not after the backward step


@pytest.mark.parametrize("rate", [0, 0.0, -1.0, -1e-9, math.nan, math.inf, -math.inf])
def test_constructor_rejects_bad_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=rate, burst=1, now=0.0)


@pytest.mark.parametrize("burst", [0, -1, -100])
def test_constructor_rejects_bad_burst(burst: int) -> None:
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(rate=1.0, burst=burst, now=0.0)


def test_constructor_accepts_the_edges() -> None:
    bucket = TokenBucket(rate=1e-9, burst=1, now=0.0)
    assert bucket.take(0.0) == 0
    assert bucket.take(0.0) == math.ceil(1e12)
    assert TokenBucket(rate=1e9, burst=10**6, now=0.0).tokens(0.0) == 10**6


# ---------------------------------------------------------------------------
# Properties

rates = st.floats(min_value=0.01, max_value=10_000.0, allow_nan=False, allow_infinity=False)
bursts = st.integers(min_value=1, max_value=50)
starts = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
steps = st.lists(
    st.tuples(
        st.floats(min_value=-5.0, max_value=5.0, allow_nan=False, allow_infinity=False),
        st.integers(min_value=1, max_value=5),  # takes at that instant
    ),
    max_size=60,
)


@given(rates, bursts, starts, steps)
def test_takes_bounded_by_burst_plus_rate_times_elapsed(
    rate: float, burst: int, t0: float, schedule: list[tuple[float, int]]
) -> None:
    """The bucket's defining bound: over any window of calls, successful takes are at
    most burst + rate * (clock advance over the window). Backward steps are allowed;
    "advance" is measured on the high-water mark of the clock, since a clock that
    goes back must not mint tokens and a return to a seen time must not either."""
    bucket = TokenBucket(rate, burst, t0)
    high = t0
    events: list[tuple[float, bool]] = []  # (high-water mark at the call, granted)
    now = t0
    for step, count in schedule:
        now += step
        high = max(high, now)
        for _ in range(count):
            events.append((high, bucket.take(now) == 0))
    # For every window [i, j], starting from the state before call i (whose clock
    # high-water mark is the one at call i-1, or t0).
    for i in range(len(events)):
        before = events[i - 1][0] if i else t0
        granted = 0
        for j in range(i, len(events)):
            granted += events[j][1]
            assert granted <= burst + rate * (events[j][0] - before) + 1e-9


@given(rates, bursts, starts, st.lists(st.floats(0.0, 5.0), max_size=40))
def test_monotonic_clock_window_bound(
    rate: float, burst: int, t0: float, gaps: list[float]
) -> None:
    """The same bound with the plain wording: a forward-only clock, takes in [t_a, t_b]
    are at most burst + rate * (t_b - t_a)."""
    bucket = TokenBucket(rate, burst, t0)
    times = [t0]
    for gap in gaps:
        times.append(times[-1] + gap)
    grants = [bucket.take(t) == 0 for t in times for _ in range(3)]
    stamps = [t for t in times for _ in range(3)]
    for a in range(len(stamps)):
        for b in range(a, len(stamps)):
            assert sum(grants[a : b + 1]) <= burst + rate * (stamps[b] - stamps[a]) + 1e-9


@given(rates, bursts, starts, st.floats(0.0, 2.0))
def test_tokens_stay_within_zero_and_burst(rate: float, burst: int, t0: float, gap: float) -> None:
    bucket = TokenBucket(rate, burst, t0)
    now = t0
    for _ in range(burst + 3):
        bucket.take(now)
        assert 0.0 <= bucket.tokens(now) <= burst
        now += gap
    assert bucket.tokens(now + 1e7) == burst


@given(
    st.floats(min_value=0.05, max_value=5000.0),
    starts,
    st.floats(min_value=0.0, max_value=1.0),
)
def test_retry_after_is_right_within_one_ms(rate: float, t0: float, fraction: float) -> None:
    """For arbitrary rates the boundary itself can sit within float rounding of a whole
    millisecond, so this asserts the bound to within one ms: one ms after the promised
    time a take succeeds, and two ms before it (one whole ms short of the real
    instant, which lies in (retry-1, retry] ms) a take still fails."""
    bucket = TokenBucket(rate, 1, t0)
    assert bucket.take(t0) == 0
    t = t0 + fraction / rate  # somewhere before the next token
    retry = bucket.take(t)
    if retry == 0:  # fraction == 1.0 can land exactly on the token
        return
    assert retry >= 1
    real_ms = (1.0 - fraction) / rate * 1000.0
    assert retry - 1 <= real_ms + 1e-6 and real_ms <= retry + 1e-6
    if retry >= 2:
        probe = TokenBucket(rate, 1, t0)
        probe.take(t0)
        probe.take(t)
        assert probe.take(t + (retry - 2) / 1000) > 0
    assert bucket.take(t + (retry + 1) / 1000) == 0
