"""Keyed token buckets: per-IP enrollment, per-agent uploads (pure; time is passed in).

A bucket holds up to `burst` tokens and refills at `rate` tokens per second; a request
takes one or is refused with the seconds until one is back. Keys idle long enough to be
full again are forgotten, so memory is bounded by the keys active within ~burst/rate.
"""

from __future__ import annotations

import threading

__all__ = ["RateLimiter"]


class RateLimiter:
    def __init__(self, *, per_minute: float, burst: float | None = None, max_keys: int = 100_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(1.0, per_minute if burst is None else burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str, now: float) -> float:
        """0.0 when allowed; otherwise the seconds to wait (nothing taken)."""
        if not self.enabled:
            return 0.0
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.max_keys:
                self._forget_full(now)
            return 0.0

    def _forget_full(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {k: (t, at) for k, (t, at) in self._buckets.items() if now - at < full_after}
        while len(self._buckets) > self.max_keys:  # still too many: drop the oldest
            self._buckets.pop(min(self._buckets, key=lambda k: self._buckets[k][1]))
