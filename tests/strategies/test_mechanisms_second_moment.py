"""The round's second moment (`wants_second_moment`) is the weighted
mean of the *squared* deltas, folded by `coordinator.aggregation.RoundUpdates` beside the
mean. Oracle: dense numpy over the same uploads. A fold of δ instead of δ² (or of the
unclipped δ, or of the aux statistics) fails here: the deltas have negative entries,
magnitudes above 1 and a clipped upload."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregation import RoundUpdates
from coordinator.protocol import AggregationSpec
from sparse_kernels import DeltaMeta, ModelDelta, SparseTensor

SHAPES = {"a": (3, 4), "b": (5,), "aux/loss": (2,)}


def _upload(rng: np.random.Generator, n: int, *, density: float, scale: float) -> tuple[ModelDelta, dict]:
    dense = {}
    tensors = []
    for name, shape in SHAPES.items():
        v = (scale * rng.standard_normal(shape)).astype(np.float32)
        if not name.startswith("aux/"):
            v *= rng.random(shape) < density  # sparse support, different per agent
        dense[name] = v
        tensors.append(SparseTensor.from_dense_nonzero(name, v))
    return ModelDelta(DeltaMeta(num_samples=n), tuple(tensors)), dense


@pytest.mark.parametrize("fill", ["zero", "senders"])
def test_squares_are_the_weighted_mean_of_squared_clipped_deltas(fill: str) -> None:
    rng = np.random.default_rng(0)
    bound = 4.0
    ups = RoundUpdates((1, 1), SHAPES, AggregationSpec(clip_norm=bound), bound, wants_squares=True)
    sent = [_upload(rng, n, density=0.6, scale=s) for n, s in ((10, 1.5), (30, 0.7), (20, 3.0))]
    for i, (delta, _) in enumerate(sent):
        assert ups.add(f"agent{i}", delta, delta.meta.num_samples, digest=str(i), nbytes=1)
    assert not ups.add("agent0", sent[0][0], 10, digest="again", nbytes=1)  # a refold counts once
    assert ups.clipped >= 1  # the third upload is over the bound

    mean, _aux, squares = ups.reduce(fill)

    assert squares is not None and set(squares) == {"a", "b"}  # no aux in the moments
    weights = np.array([10.0, 30.0, 20.0])
    for name in ("a", "b"):
        clipped = []
        for _, d in sent:  # the L2 clip is over the model tensors, aux excluded
            norm = np.sqrt(sum(float(np.sum(d[k].astype(np.float64) ** 2)) for k in ("a", "b")))
            clipped.append(d[name].astype(np.float64) * min(1.0, bound / norm))
        stack = np.stack(clipped)  # (clients, *shape)
        if fill == "zero":
            den = np.full(stack.shape[1:], weights.sum())
        else:
            den = np.tensordot(weights, (stack != 0).astype(np.float64), axes=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            expect_sq = np.where(den > 0, np.tensordot(weights, stack**2, axes=1) / den, 0.0)
            expect_mean = np.where(den > 0, np.tensordot(weights, stack, axes=1) / den, 0.0)
        np.testing.assert_allclose(squares[name], expect_sq, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(mean[name], expect_mean, rtol=1e-5, atol=1e-7)
        # E[δ²] ≥ E[δ]² everywhere, strictly where the uploads disagree: δ folded as δ would break it
        assert (squares[name] >= mean[name] ** 2 - 1e-6).all()


def test_no_squares_unless_the_strategy_wants_them() -> None:
    rng = np.random.default_rng(1)
    ups = RoundUpdates((1, 1), SHAPES, AggregationSpec(clip_relative=None), None)
    delta, _ = _upload(rng, 5, density=1.0, scale=1.0)
    ups.add("x", delta, 5, digest="d", nbytes=1)
    assert ups.reduce("zero")[2] is None
