"""Group commit: many threads' items applied in batches, one transaction per batch.

An accepted upload must be durable before it is acknowledged, and with SQLite's
`synchronous=FULL` every commit is an fsync (~4 ms here). Committed one by one under the
service lock, uploads queue behind each other's fsyncs; so the threads that arrive while
a batch is being committed wait, and the next of them to find no batch in flight becomes
the leader and commits everything that queued up, in arrival order, in one go. A thread
returns only when its own item's outcome is known, so "200 means durable" still holds.

No thread of its own: the leader is one of the callers (leader/follower), so there is
nothing to start, stop or leak.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")


class _Slot(Generic[T, R]):
    __slots__ = ("item", "done", "result", "error")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """`submit(item)` from any thread returns `apply(batch)`'s outcome for that item.

    `apply` receives the items queued since the last batch, in arrival order, and returns
    one outcome per item: a result, or an exception to raise in that item's thread. An
    exception escaping `apply` is raised in every thread of the batch."""

    def __init__(self, apply: Callable[[Sequence[T]], Sequence[R | BaseException]]) -> None:
        self._apply = apply
        self._cv = threading.Condition()
        self._pending: list[_Slot[T, R]] = []
        self._leading = False
        self.batches = 0  # how many batches were applied (for tests and metrics)
        self.largest_batch = 0

    def submit(self, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        with self._cv:
            self._pending.append(slot)
            while self._leading and not slot.done:
                self._cv.wait()
            if not slot.done:  # nobody is committing and this item is still queued: lead
                self._leading = True
                batch, self._pending = self._pending, []
        if not slot.done:
            self._lead(batch)
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _lead(self, batch: list[_Slot[T, R]]) -> None:
        try:
            outcomes = self._apply([s.item for s in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"group commit: {len(outcomes)} outcomes for {len(batch)} items")
            for s, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    s.error = outcome
                else:
                    s.result = outcome
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
            for s in batch:
                s.error = exc
        finally:
            with self._cv:
                for s in batch:
                    s.done = True
                self._leading = False
                self.batches += 1
                self.largest_batch = max(self.largest_batch, len(batch))
                self._cv.notify_all()
