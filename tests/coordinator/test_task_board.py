"""The task board's long polls: paced wake-ups when a round opens, nothing left behind.

Mutations these tests kill: waking every waiter at once (the first batch is larger than
WAKE_BATCH); a timed-out waiter left in the board (its registry grows with every poll of
an idle coordinator); a waiter woken but never given its task.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator import tasks
from coordinator.tasks import OpenRound, TaskBoard


def _round(agents: list[str]) -> OpenRound:
    return OpenRound("fed", 1, 1, frozenset(agents), time.time() + 60, b'{"task": 1}')


def test_a_round_opening_wakes_long_polls_in_paced_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "WAKE_PACE_S", 0.05)
    board = TaskBoard()
    agents = [f"a{i}" for i in range(2 * tasks.WAKE_BATCH + 10)]

    async def main() -> list[tuple[bytes | None, float]]:
        async def poll(agent: str) -> tuple[bytes | None, float]:
            task = await board.wait_for(agent, 10)
            return task, time.monotonic()

        polls = [asyncio.create_task(poll(a)) for a in agents]
        await asyncio.sleep(0.05)  # all waiting
        t0 = time.monotonic()
        board.publish(_round(agents))
        got = await asyncio.gather(*polls)
        return [(task, t - t0) for task, t in got]

    got = asyncio.run(main())
    assert all(task == b'{"task": 1}' for task, _ in got)
    first = sum(1 for _, dt in got if dt < 0.03)
    assert first == tasks.WAKE_BATCH, f"{first} woken in the first batch"
    assert max(dt for _, dt in got) >= 2 * 0.05 - 0.01  # three batches, two pauses between them
    assert not board._waiters and not board._waking


def test_timed_out_long_polls_leave_nothing_behind() -> None:
    board = TaskBoard()

    async def main() -> list[bytes | None]:
        return await asyncio.gather(*(board.wait_for(f"a{i}", 0.05) for i in range(50)))

    assert asyncio.run(main()) == [None] * 50
    assert not board._waiters


def test_a_poll_arriving_while_others_are_woken_gets_its_task_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "WAKE_PACE_S", 0.5)
    board = TaskBoard()
    agents = [f"a{i}" for i in range(tasks.WAKE_BATCH + 5)]

    async def main() -> float:
        waiting = [asyncio.create_task(board.wait_for(a, 10)) for a in agents[:-1]]
        await asyncio.sleep(0.02)
        board.publish(_round(agents))
        await asyncio.sleep(0.02)  # the first batch is out, the rest wait for the pace
        t0 = time.monotonic()
        assert await board.wait_for(agents[-1], 10) == b'{"task": 1}'
        late = time.monotonic() - t0
        await asyncio.gather(*waiting)
        return late

    assert asyncio.run(main()) < 0.05
