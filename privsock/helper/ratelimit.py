"""A token bucket: pure arithmetic, the clock is passed in.

The helper holds one bucket. Every CREATE takes a token *before* the policy
decision, so probing the policy is rate limited as well.
"""

from __future__ import annotations

import math


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` stored; starts full, or with
    ``tokens`` (a shared helper's bucket starts empty, so reconnecting buys nothing)."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float, tokens: float | None = None) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive finite number, not {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst) if tokens is None else min(float(burst), max(0.0, tokens))
        self._stamp = now

    def _refill(self, now: float) -> None:
        # A clock that steps backwards must not mint tokens: only move forwards.
        if now > self._stamp:
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def take(self, now: float) -> int:
        """Take one token. Returns 0 on success, otherwise the whole milliseconds
        (at least 1) until one token will be there."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - self._tokens) / self.rate * 1000.0))

    def tokens(self, now: float) -> float:
        self._refill(now)
        return self._tokens
