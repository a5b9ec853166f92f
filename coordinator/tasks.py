"""The task board: which rounds are open, for whom, and waking long-polling agents.

Long polls are coroutines on the server's event loop: a waiting agent holds no thread and
costs no database query. The scheduler thread publishes each open round here (its task
JSON is built once per round, or once per width level); the upload path marks
agents done. A short lock guards the index (never held across I/O), so the event loop
never waits on the scheduler's round closing. Waiters are woken in paced batches
(WAKE_BATCH), so a round opening for many agents does not stall every other request.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["WAKE_BATCH", "OpenRound", "TaskBoard"]

# A round opening wakes every long poll at once; each woken agent gets its task and then
# downloads the model, so 1000 agents are ~1000 responses and 1000 downloads queued on the
# event loop in one go, and /health (and every upload) waits behind all of them. Waking
# them WAKE_BATCH at a time, WAKE_PACE_S apart (later when the loop runs late), lets other
# requests in between batches; 1000 agents all have their task within about a second.
WAKE_BATCH = 64
WAKE_PACE_S = 0.005


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
        # long polls waiting for a change (a dict: ordered, and a timed-out one leaves in O(1))
        self._waiters: dict[asyncio.Future[None], None] = {}
        self._waking: deque[asyncio.Future[None]] = deque()  # ... told of one, not yet woken
        self._release_scheduled = False
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
        loop = self._attach()
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            task = self.find(agent_id)
            if task is not None or self._closed:
                return task
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            woken: asyncio.Future[None] = loop.create_future()
            self._waiters[woken] = None
            timer = loop.call_later(min(remaining, 5.0), _resolve, woken)
            try:
                await woken
            finally:
                timer.cancel()
                self._waiters.pop(woken, None)

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._waiters, self._waking = loop, {}, deque()
        return loop

    def _wake(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        # everyone waiting now looks again, a batch at a time (see WAKE_BATCH); a waiter
        # arriving later sees the change itself, before it waits
        self._waking.extend(self._waiters)
        self._waiters.clear()
        if not self._release_scheduled:
            self._release()

    def _release(self) -> None:
        self._release_scheduled = False
        for _ in range(min(WAKE_BATCH, len(self._waking))):
            _resolve(self._waking.popleft())
        if self._waking and self._loop is not None:
            self._release_scheduled = True
            self._loop.call_later(WAKE_PACE_S, self._release)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
