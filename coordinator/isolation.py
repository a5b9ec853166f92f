"""One federation's failure never stops another: per-federation back-off for the scheduler.

A federation whose tick raises is skipped until its retry time (exponential back-off,
capped). Storage trouble (disk full, database unavailable) is transient: it is retried
for as long as it lasts. Anything else is a property of the federation (overflowing
weights, a config that cannot load): after `max_failures` in a row it is failed for good,
with its reason. Pure bookkeeping; time is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy.exc import DBAPIError

from coordinator.errors import Unavailable

__all__ = ["Backoff", "is_transient"]


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError | DBAPIError | Unavailable)


@dataclass
class _Failing:
    failures: int
    retry_at: float
    reason: str
    transient: bool


class Backoff:
    def __init__(self, *, max_failures: int = 3, base_s: float = 1.0, cap_s: float = 60.0) -> None:
        self.max_failures, self.base_s, self.cap_s = max_failures, base_s, cap_s
        self._failing: dict[str, _Failing] = {}

    def ready(self, fid: str, now: float) -> bool:
        f = self._failing.get(fid)
        return f is None or now >= f.retry_at

    def record(self, fid: str, exc: BaseException, now: float) -> Literal["retry", "fail"]:
        prev = self._failing.get(fid)
        n = (prev.failures if prev else 0) + 1
        transient = is_transient(exc)
        reason = f"{type(exc).__name__}: {exc}"[:500]
        self._failing[fid] = _Failing(n, now + min(self.cap_s, self.base_s * 2 ** (n - 1)), reason, transient)
        return "retry" if transient or n < self.max_failures else "fail"

    def clear(self, fid: str) -> None:
        self._failing.pop(fid, None)

    def snapshot(self, now: float) -> list[dict[str, object]]:
        return [{"federation_id": fid, "failures": f.failures, "reason": f.reason, "transient": f.transient,
                 "retry_in_s": round(max(0.0, f.retry_at - now), 3)} for fid, f in sorted(self._failing.items())]
