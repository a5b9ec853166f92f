"""Streaming sparse aggregation against the dense weighted-mean oracle."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_kernels import (
    CodecError,
    DeltaMeta,
    ModelDelta,
    ShapeMismatch,
    SparseAccumulator,
    encode,
    select_topk,
)

SHAPES = {"conv": (6, 3, 3, 3), "fc": (10, 6), "bias": (10,)}


def _updates(n: int, density: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        dense = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
        sparse = select_topk(dense, density=density)
        out.append((ModelDelta(DeltaMeta(num_samples=10 + 7 * i), tuple(sparse.values())), 10.0 + 7 * i))
    return out


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_mean_equals_dense_weighted_mean(density: float) -> None:
    updates = _updates(9, density)
    acc = SparseAccumulator(SHAPES)
    for md, w in updates:
        acc.fold(md, w)
    # the oracle, plain numpy on densified updates
    dense = [(md.to_dense(), w) for md, w in updates]
    sent = [  # per update, which coordinates it carries
        {t.name: np.isin(np.arange(t.numel), t.indices).reshape(t.shape) for t in md.tensors}
        for md, _ in updates
    ]
    zero = acc.mean(fill="zero")
    senders = acc.mean(fill="senders")
    total = sum(w for _, w in updates)
    for name in SHAPES:
        num = sum(w * d[name].astype(np.float64) for d, w in dense)
        np.testing.assert_allclose(zero[name], num / total, rtol=1e-5, atol=1e-6)
        den = sum(w * m[name] for m, (_, w) in zip(sent, updates, strict=True))
        want = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        np.testing.assert_allclose(senders[name], want, rtol=1e-5, atol=1e-6)
    assert acc.count == 9 and acc.total_weight == pytest.approx(total)


def test_fold_bytes_uses_num_samples_and_rejects_atomically() -> None:
    (md, w), (md2, _) = _updates(2, 0.2)
    acc = SparseAccumulator(SHAPES)
    acc.fold_bytes(encode(md, values="fp32"))
    before = acc.state_dict()
    bad = ModelDelta(md2.meta, tuple(md2.tensors) + (md2.tensors[0].__class__("extra", (3,), np.array([0]), np.array([1.0])),))
    with pytest.raises(ShapeMismatch):
        acc.fold_bytes(encode(bad))
    with pytest.raises(CodecError):
        acc.fold_bytes(encode(md2)[:-3])
    with pytest.raises(CodecError):
        acc.fold_bytes(encode(ModelDelta(DeltaMeta(num_samples=0), md2.tensors)))
    after = acc.state_dict()
    assert acc.count == 1 and acc.total_weight == w
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_state_dict_round_trip_continues_identically() -> None:
    ups = _updates(4, 0.2)
    a = SparseAccumulator(SHAPES)
    for md, w in ups[:2]:
        a.fold(md, w)
    b = SparseAccumulator.from_state_dict(a.state_dict())
    for md, w in ups[2:]:
        a.fold(md, w)
        b.fold(md, w)
    for name in SHAPES:
        np.testing.assert_array_equal(a.mean(fill="senders")[name], b.mean(fill="senders")[name])
    assert b.count == 4


def test_empty_accumulator_and_bad_weight() -> None:
    acc = SparseAccumulator(SHAPES)
    assert all(np.all(v == 0) for v in acc.mean().values())
    md, _ = _updates(1, 0.1)[0]
    with pytest.raises(ValueError):
        acc.fold(md, 0.0)
    with pytest.raises(ValueError):
        acc.fold(md, float("nan"))
    assert acc.count == 0
