"""Robust aggregation against a dense numpy oracle (hypothesis over random sparse updates).

Mutations these kill: median of the senders that ignores fill (NaN→0), an off-by-one in the
trimmed window, trimming a fixed count instead of floor(ratio·m), clipping that scales the
aux statistics or fails to clip, a norm that overflows in float32."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_kernels import DeltaMeta, ModelDelta, SparseTensor
from sparse_kernels.robust import clip_delta, coordinate_median, delta_norm, trimmed_mean

SHAPES = {"w": (3, 4), "b": (5,)}
META = DeltaMeta(federation_id="f", round=1, base_version=0, num_samples=1, kind="delta")


def _random_deltas(seed: int, n: int) -> tuple[list[ModelDelta], dict[str, np.ndarray]]:
    """n sparse deltas and, per tensor, their dense (n, numel) form with NaN for unsent."""
    rng = np.random.default_rng(seed)
    dense = {k: np.full((n, int(np.prod(s))), np.nan) for k, s in SHAPES.items()}
    deltas = []
    for i in range(n):
        tensors = []
        for k, s in SHAPES.items():
            numel = int(np.prod(s))
            idx = np.sort(rng.choice(numel, size=rng.integers(0, numel + 1), replace=False))
            vals = rng.normal(size=idx.size).astype(np.float32)
            dense[k][i, idx] = vals
            tensors.append(SparseTensor(k, s, idx, vals))
        deltas.append(ModelDelta(META, tuple(tensors)))
    return deltas, dense


def _oracle(dense: np.ndarray, fill: str, fn) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = np.zeros(dense.shape[1])
    for j in range(dense.shape[1]):
        col = dense[:, j]
        col = np.nan_to_num(col) if fill == "zero" else col[~np.isnan(col)]
        out[j] = fn(np.sort(col)) if col.size else 0.0
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 9), fill=st.sampled_from(["zero", "senders"]))
def test_median_matches_numpy(seed: int, n: int, fill: str) -> None:
    deltas, dense = _random_deltas(seed, n)
    got = coordinate_median(deltas, SHAPES, fill=fill)  # type: ignore[arg-type]
    for k, s in SHAPES.items():
        np.testing.assert_allclose(got[k], _oracle(dense[k], fill, np.median).reshape(s), rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 9), fill=st.sampled_from(["zero", "senders"]),
       ratio=st.sampled_from([0.0, 0.1, 0.2, 0.34, 0.49]))
def test_trimmed_mean_matches_numpy(seed: int, n: int, fill: str, ratio: float) -> None:
    deltas, dense = _random_deltas(seed, n)

    def trim(col: np.ndarray) -> float:
        k = int(np.floor(ratio * col.size))
        return float(col[k: col.size - k].mean())

    got = trimmed_mean(deltas, SHAPES, trim_ratio=ratio, fill=fill)  # type: ignore[arg-type]
    for k, s in SHAPES.items():
        np.testing.assert_allclose(got[k], _oracle(dense[k], fill, trim).reshape(s), rtol=1e-6, atol=1e-6)


def test_median_ignores_one_huge_outlier() -> None:
    honest = [ModelDelta(META, (SparseTensor("b", (5,), np.arange(5), np.full(5, v, np.float32)),))
              for v in (1.0, 1.1, 0.9)]
    attacker = ModelDelta(META, (SparseTensor("b", (5,), np.arange(5), np.full(5, 3e38, np.float32)),))
    got = coordinate_median([*honest, attacker], {"b": (5,)})
    np.testing.assert_allclose(got["b"], np.full(5, 1.05), rtol=1e-6)


def test_clip_scales_deltas_not_statistics_and_survives_float32_extremes() -> None:
    big = SparseTensor("w", (2,), np.arange(2), np.array([3e38, 3e38], np.float32))
    aux = SparseTensor("aux/loss", (1,), np.arange(1), np.array([7.0], np.float32))
    delta = ModelDelta(META, (big, aux))
    assert np.isfinite(delta_norm(delta, skip_prefix="aux/"))
    clipped, norm = clip_delta(delta, 2.0, skip_prefix="aux/")
    assert norm > 1e38
    assert np.isclose(delta_norm(clipped, skip_prefix="aux/"), 2.0)
    assert clipped.tensors[1].values[0] == 7.0  # statistics untouched
    same, _ = clip_delta(clipped, 5.0, skip_prefix="aux/")
    assert same is clipped  # within the bound: unchanged
