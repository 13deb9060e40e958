"""Per-session token buckets: ``rate_burst`` messages at once, refilled at ``rate_per_minute``.

Buckets live in this process, keyed by session id, so a session's budget survives reconnects to the
same instance.  A full bucket is the same as no bucket, which is what pruning relies on.
"""

from __future__ import annotations

import time


class RateLimiter:
    PRUNE_AT = 10_000  # buckets held before idle (full) ones are dropped

    def __init__(self, per_minute: float, burst: int):
        self.rate_per_s, self.burst = per_minute / 60.0, float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time of last update)

    def _tokens(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate_per_s)

    def take(self, key: str) -> float | None:
        """Spend one token: None when allowed, else the seconds until a token is available."""
        now = time.monotonic()
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_s
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self.PRUNE_AT:
            self._buckets = {k: v for k, v in self._buckets.items() if self._tokens(k, now) < self.burst}
        return None
