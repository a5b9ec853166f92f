"""The coordinator's pure policies: clip bound, update weight, fold-once, rate limits,
back-off. Each assertion names the mutation it kills."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregation import RoundUpdates, clip_bound, update_weight
from coordinator.errors import Unavailable
from coordinator.isolation import Backoff
from coordinator.protocol import AggregationSpec
from coordinator.ratelimit import RateLimiter
from sparse_kernels import DeltaMeta, ModelDelta, SparseTensor


def test_clip_bound_is_relative_to_the_weight_norm_with_a_floor_of_one() -> None:
    w = {"a": np.array([3.0, 4.0], np.float32)}  # ||w|| = 5
    assert clip_bound(AggregationSpec(), w) == pytest.approx(15.0)  # default 3 x ||w|| (not ||w||²)
    assert clip_bound(AggregationSpec(), {"a": np.zeros(2, np.float32)}) == 3.0  # floor: max(1, 0)
    assert clip_bound(AggregationSpec(clip_norm=0.5), w) == 0.5  # absolute wins
    assert clip_bound(AggregationSpec(clip_relative=None), w) is None  # off


def test_update_weight_caps_claims_and_can_be_uniform() -> None:
    assert update_weight(AggregationSpec(max_num_samples=100), 10**9) == 100.0
    assert update_weight(AggregationSpec(max_num_samples=100), 7) == 7.0
    assert update_weight(AggregationSpec(weighting="uniform"), 5000) == 1.0


def _delta(v: float) -> ModelDelta:
    return ModelDelta(DeltaMeta(num_samples=1), (SparseTensor("w", (2,), np.arange(2), np.full(2, v, np.float32)),))


def test_an_agent_is_folded_once_whatever_calls_add() -> None:
    ups = RoundUpdates((1, 1), {"w": (2,)}, AggregationSpec(clip_relative=None), None)
    assert ups.add("a", _delta(1.0), 1, digest="x", nbytes=10)
    assert not ups.add("a", _delta(1.0), 1, digest="x", nbytes=10)  # the audit's double fold
    assert ups.add("b", _delta(0.0), 1, digest="y", nbytes=10)
    mean, _, _ = ups.reduce("zero")
    np.testing.assert_allclose(mean["w"], [0.5, 0.5])
    assert ups.count == 2 and ups.bytes_up == 20


def test_rate_limiter_refills_at_its_rate() -> None:
    lim = RateLimiter(per_minute=60, burst=2)  # one token a second
    assert [lim.take("ip", 0.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]
    assert lim.take("ip", 0.5) == pytest.approx(0.5)  # nothing taken by the refusal
    assert lim.take("ip", 1.0) == 0.0
    assert lim.take("other", 1.0) == 0.0  # keys are independent
    assert RateLimiter(per_minute=0).take("x", 0.0) == 0.0  # 0 = off


def test_backoff_fails_persistent_errors_and_retries_storage_errors_forever() -> None:
    b = Backoff(max_failures=3, base_s=1.0, cap_s=4.0)
    assert [b.record("f", ValueError("x"), 0.0) for _ in range(3)] == ["retry", "retry", "fail"]
    assert not b.ready("f", 0.0) and b.ready("f", 4.0)  # 1, 2, 4 s (capped)
    assert all(b.record("g", Unavailable("disk"), 0.0) == "retry" for _ in range(10))
    assert all(b.record("h", OSError(28, "No space left"), 0.0) == "retry" for _ in range(10))
    b.clear("f")
    assert b.ready("f", 0.0) and [s["federation_id"] for s in b.snapshot(0.0)] == ["g", "h"]


@pytest.mark.parametrize(("received", "declined", "now", "want"), [
    (1, 0, 0.0, "wait"),    # 1 of 3 answered, before the deadline
    (2, 1, 0.0, "close"),   # everyone answered: no need to wait for the deadline
    (0, 3, 0.0, "retry"),   # everyone declined: a new sample at once
    (1, 2, 0.0, "retry"),   # answered, but fewer updates than min_clients (2)
    (2, 0, 10.0, "close"),  # deadline with enough updates
    (1, 0, 10.0, "retry"),  # deadline with too few
])
def test_round_decision_counts_declines_as_answers(received: int, declined: int, now: float, want: str) -> None:
    from coordinator.rounds import round_decision

    assert round_decision(received=received, declined=declined, selected=3, min_clients=2,
                          deadline=5.0, now=now) == want


def test_secrets_never_start_with_a_dash() -> None:
    # a token starting with "-" is read as an option on a command line (`--enrollment-token
    # -x…`); 1 in 64 bare token_urlsafe strings do. Mutation killed: dropping the prefix.
    from coordinator.auth import new_secret

    tokens = [new_secret() for _ in range(2000)]
    assert not any(t.startswith("-") for t in tokens) and len(set(tokens)) == len(tokens)
    assert all(len(t) >= 43 for t in tokens)  # 256 bits of urlsafe base64, plus the prefix
