"""The task board: which rounds are open, for whom, and waking long-polling agents.

Long polls are coroutines on the server's event loop: a waiting agent holds no thread and
costs no database query. The scheduler thread publishes each open round here (its task
JSON is built once per round, or once per width level); the upload path marks
agents done. A short lock guards the index (never held across I/O), so the event loop
never waits on the scheduler's round closing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field

__all__ = ["OpenRound", "TaskBoard"]


@dataclass
class OpenRound:
    federation_id: str
    round: int
    attempt: int
    selected: frozenset[str]
    deadline: float
    task_json: bytes
    done: set[str] = field(default_factory=set)
    # per agent, when agents get different tasks (width levels: one bytes object per level)
    task_for: dict[str, bytes] = field(default_factory=dict)


class TaskBoard:
    def __init__(self) -> None:
        self._open: dict[str, OpenRound] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._closed = False

    # ---------------------------------------------------------------- writers (any thread)
    def publish(self, entry: OpenRound) -> None:
        with self._lock:
            old = self._open.get(entry.federation_id)
            if old is not None and (old.round, old.attempt) == (entry.round, entry.attempt):
                entry.done |= old.done
            self._open[entry.federation_id] = entry
        self._wake()

    def withdraw(self, fid: str) -> None:
        with self._lock:
            self._open.pop(fid, None)

    def keep_only(self, fids: set[str]) -> None:
        with self._lock:
            for fid in [f for f in self._open if f not in fids]:
                del self._open[fid]

    def mark_done(self, fid: str, rnd: int, attempt: int, agent_id: str) -> None:
        with self._lock:
            entry = self._open.get(fid)
            if entry is not None and (entry.round, entry.attempt) == (rnd, attempt):
                entry.done.add(agent_id)

    def current(self, fid: str) -> OpenRound | None:
        with self._lock:
            return self._open.get(fid)

    def close(self) -> None:
        self._closed = True
        self._wake()

    # ---------------------------------------------------------------- readers
    def find(self, agent_id: str, now: float | None = None) -> bytes | None:
        now = time.time() if now is None else now
        with self._lock:
            for entry in self._open.values():
                if agent_id in entry.selected and agent_id not in entry.done and entry.deadline > now:
                    return entry.task_for.get(agent_id, entry.task_json)
        return None

    async def wait_for(self, agent_id: str, wait_s: float) -> bytes | None:
        """A task for `agent_id`, or None after `wait_s` seconds (on the event loop)."""
        self._attach()
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            task = self.find(agent_id)
            if task is not None or self._closed:
                return task
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            assert self._changed is not None
            changed = self._changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(remaining, 5.0))

    def _attach(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._changed = loop, asyncio.Event()

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        # every waiter holds the old event; set it and hand out a fresh one
        if self._changed is not None:
            old, self._changed = self._changed, asyncio.Event()
            old.set()
