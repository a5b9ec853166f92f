"""Group commit: uploads that queue behind a commit are recorded together, each still
answered with its own outcome, and the round's mean is exactly the accepted updates'.

Mutations these tests kill:
- GroupCommit applying one item per call (no batching): `batches`/`largest_batch` differ;
- results handed to the wrong waiter (e.g. the batch reversed): each thread checks its own;
- a per-item error raised in every thread, or an escaping error left with the leader flag
  set (the next submit would hang): the error tests;
- `_admit` forgetting the batch's earlier uploads (`in_batch`): a twin inside one batch
  breaks the batch's transaction (two rows for one agent) and a copy of another agent's
  bytes inside one batch is accepted, so the global model misses the oracle.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from coordinator.group_commit import GroupCommit
from tests.coordinator.test_aggregation_oracle import (
    _assert_close,
    _encode,
    _enroll,
    _model,
    _oracle,
    _put,
    _random_delta,
    _wait_task,
    _wait_version,
)
from tests.federation_fixtures import small_federation
from tests.helpers import ADMIN


def _wait(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


class _Gated:
    """An `apply` whose first call blocks until released, recording every batch."""

    def __init__(self, fail: Callable[[int], BaseException | None] = lambda _: None) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[int]] = []
        self.fail = fail

    def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        self.entered.set()
        self.release.wait(10)
        self.batches.append(list(items))
        return [self.fail(i) or i * 10 for i in items]


def _submit_all(gc: GroupCommit[int, int], gate: _Gated, items: list[int]) -> list[Any]:
    """Item 0 leads a batch that blocks; the rest queue behind it; then release."""
    outcomes: list[Any] = [None] * len(items)

    def one(k: int) -> None:
        try:
            outcomes[k] = gc.submit(items[k])
        except BaseException as exc:  # noqa: BLE001
            outcomes[k] = exc

    threads = [threading.Thread(target=one, args=(0,))]
    threads[0].start()
    assert gate.entered.wait(5)
    threads += [threading.Thread(target=one, args=(k,)) for k in range(1, len(items))]
    for t in threads[1:]:
        t.start()
    _wait(lambda: len(gc._pending) == len(items) - 1, "the followers to queue")
    gate.release.set()
    for t in threads:
        t.join(10)
    return outcomes


def test_items_queued_behind_a_commit_go_in_one_batch_each_with_its_own_result() -> None:
    gate = _Gated()
    gc: GroupCommit[int, int] = GroupCommit(gate)
    items = list(range(1, 9))
    outcomes = _submit_all(gc, gate, items)
    assert outcomes == [i * 10 for i in items]
    assert gate.batches[0] == [1] and sorted(gate.batches[1]) == items[1:]
    assert (gc.batches, gc.largest_batch) == (2, 7)


def test_an_item_error_is_raised_only_in_its_own_thread() -> None:
    gate = _Gated(fail=lambda i: ValueError(f"bad {i}") if i == 5 else None)
    gc: GroupCommit[int, int] = GroupCommit(gate)
    outcomes = _submit_all(gc, gate, [1, 2, 5, 7])
    assert outcomes[:2] == [10, 20] and outcomes[3] == 70
    assert isinstance(outcomes[2], ValueError) and str(outcomes[2]) == "bad 5"


def test_an_error_escaping_apply_reaches_the_whole_batch_and_the_next_submit_still_runs() -> None:
    calls: list[list[int]] = []

    def apply(items: Sequence[int]) -> list[int | BaseException]:
        calls.append(list(items))
        if len(calls) == 1:
            raise OSError("disk full")
        return list(items)

    gc: GroupCommit[int, int] = GroupCommit(apply)
    with pytest.raises(OSError, match="disk full"):
        gc.submit(1)
    assert gc.submit(2) == 2  # the leader flag was released
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(gc.submit, range(50))) == list(range(50))


def test_twins_and_copies_inside_one_batch_leave_exactly_the_accepted_updates(coordinator: TestClient) -> None:
    # Arrange: six agents selected for one round; the first upload's commit is held
    # (inside the batch's transaction, under the service lock) until the others queue
    svc = coordinator.app.state.service  # type: ignore[attr-defined]
    agents = _enroll(coordinator, 6)
    cfg = small_federation(rounds=1, clients_per_round=6, min_clients=6)
    fid = coordinator.post("/v1/federations", json=cfg, headers=ADMIN).json()["id"]
    assert coordinator.post(f"/v1/federations/{fid}/start", headers=ADMIN).status_code == 200
    base = _model(coordinator, fid, 0, ADMIN)
    for auth in agents:
        assert _wait_task(coordinator, auth)["round"] == 1
    deltas = [_random_delta(base, seed) for seed in range(6)]
    samples = [100, 200, 300, 50, 80, 120]
    bodies = [_encode(fid, 1, 0, d, n) for d, n in zip(deltas, samples, strict=True)]

    held, release = threading.Event(), threading.Event()
    add_update = svc.store.add_update

    def gated_add_update(*args: Any, **kwargs: Any) -> None:
        if not held.is_set():
            held.set()
            release.wait(10)
        add_update(*args, **kwargs)

    svc.store.add_update = gated_add_update
    # Act: agent 0 leads; behind it, in this order, agents 1-4, agent 1's twin and agent 5
    # sending agent 2's bytes
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(_put, coordinator, agents[0], fid, 1, bodies[0], samples[0])
        assert held.wait(10)
        queued = []
        for k, body in [(1, bodies[1]), (2, bodies[2]), (3, bodies[3]), (4, bodies[4]), (1, bodies[1]), (5, bodies[2])]:
            queued.append(pool.submit(_put, coordinator, agents[k], fid, 1, body, samples[k]))
            n = len(queued)
            _wait(lambda: len(svc._commits._pending) == n, f"upload {n} to queue")  # noqa: B023 (called at once)
        release.set()
        statuses = [first.result(), *(q.result() for q in queued)]
    assert statuses == [200, 200, 200, 200, 200, 200, 409]
    assert svc._commits.largest_batch == 6
    assert _put(coordinator, agents[5], fid, 1, bodies[5], samples[5]) == 200  # its own counts: the round closes
    _wait_version(coordinator, fid, 1, ADMIN)

    # Assert: the mean of exactly the six honest updates, each once
    want = _oracle(base, [(d, float(n)) for d, n in zip(deltas, samples, strict=True)])
    _assert_close(_model(coordinator, fid, 1, ADMIN), want)
    assert coordinator.get(f"/v1/federations/{fid}/rounds", headers=ADMIN).json()[0]["participants"] == 6
