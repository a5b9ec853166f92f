"""Partial-coverage aggregation (width levels) against a dense numpy reference with masks,
and the slice index maps it rests on."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_kernels import DeltaMeta, ModelDelta, SparseAccumulator, SparseTensor
from sparse_kernels.errors import MalformedPayload, ShapeMismatch
from sparse_kernels.reshape import apply_reshape, expand_indices, from_runs, scatter_slice, slice_shapes, to_runs

SHAPES = {"conv.weight": (6, 3, 2, 2), "conv.bias": (6,), "fc.weight": (4, 6)}
META = DeltaMeta(federation_id="f", round=1, base_version=0, num_samples=1, kind="delta")


def nested(k: int) -> dict[str, list[list[int] | None]]:
    """First-k channels of conv, and the fc inputs they feed."""
    keep = list(range(k))
    return {"conv.weight": [keep, None, None, None], "conv.bias": [keep], "fc.weight": [None, keep]}


def test_expand_indices_maps_a_slice_into_the_global_tensor():
    reshape = {"fc.weight": [None, [1, 4]]}  # (4, 6) -> (4, 2)
    local = np.arange(8).reshape(4, 2)
    global_ = np.full((4, 6), -1)
    global_.reshape(-1)[expand_indices(np.arange(8), reshape, "fc.weight", (4, 6))] = local.reshape(-1)
    np.testing.assert_array_equal(global_[:, [1, 4]], local)
    assert (np.delete(global_, [1, 4], axis=1) == -1).all()


def test_scatter_slice_inverts_apply_reshape():
    rng = np.random.default_rng(0)
    full = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    sliced = apply_reshape(full, nested(3))
    target = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    scatter_slice(target, sliced, nested(3))
    np.testing.assert_array_equal(apply_reshape(target, nested(3))["fc.weight"], sliced["fc.weight"])
    assert target["conv.bias"][3:].sum() == 0


@pytest.mark.parametrize("keep", [[0, 1, 2], [5], [0, 2, 3, 7], [3, 4, 6]])
def test_runs_round_trip(keep):
    assert from_runs(to_runs(keep), 8) == keep


@pytest.mark.parametrize("runs", [[[2, 1]], [[0, 3], [2, 4]], [[0, 9]], [], [[0]], [["a", 1]]])
def test_bad_runs_are_refused(runs):
    with pytest.raises(MalformedPayload):
        from_runs(runs, 8)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([None, 2, 4, 6]), st.integers(1, 50), st.floats(0.05, 1.0)),
                min_size=1, max_size=6), st.integers(0, 10_000))
def test_partial_coverage_mean_equals_masked_numpy_reference(clients, seed):
    """Each client trains the full model (None) or its first-k slice and sends a random
    subset of it (top-k style): per coordinate, the mean is over the clients whose slice
    covers it, unsent coordinates inside a slice counting as zero change."""
    rng = np.random.default_rng(seed)
    acc = SparseAccumulator(SHAPES)
    num = {k: np.zeros(s) for k, s in SHAPES.items()}
    den = {k: np.zeros(s) for k, s in SHAPES.items()}
    for k, weight, density in clients:
        reshape = nested(k) if k is not None else {}
        shapes = slice_shapes(SHAPES, reshape)
        tensors, dense_local = [], {}
        for name, shape in shapes.items():
            values = rng.normal(size=shape).astype(np.float32)
            values *= rng.random(shape) < density  # what was not sent is a zero change
            dense_local[name] = values
            tensors.append(SparseTensor.from_dense_nonzero(name, values))
        acc.fold(ModelDelta(META, tuple(tensors)), float(weight), slice=reshape if k is not None else None)
        # the reference: the slice's values and a weight mask, scattered densely
        for name, shape in SHAPES.items():
            value, mask = np.zeros(shape), np.zeros(shape)
            idx = np.ix_(*[np.arange(n) for n in shape])
            if k is not None:
                idx = np.ix_(*[np.arange(n) if keep is None else np.asarray(keep)
                               for keep, n in zip(nested(k)[name], shape, strict=True)])
            value[idx] = dense_local[name]
            mask[idx] = 1.0
            num[name] += weight * value
            den[name] += weight * mask
    mean = acc.mean(fill="zero")
    for name in SHAPES:
        expected = np.divide(num[name], den[name], out=np.zeros_like(num[name]), where=den[name] > 0)
        np.testing.assert_allclose(mean[name], expected, rtol=1e-5, atol=1e-6)


def test_a_slice_upload_in_the_wrong_shapes_is_refused_and_folds_nothing():
    acc = SparseAccumulator(SHAPES)
    full_bias = SparseTensor.from_dense_nonzero("conv.bias", np.ones(6, np.float32))
    with pytest.raises(ShapeMismatch):
        acc.fold(ModelDelta(META, (full_bias,)), 1.0, slice=nested(2))
    assert acc.count == 0 and not acc.mean()["conv.bias"].any()


def test_state_dict_round_trip_keeps_the_coverage():
    acc = SparseAccumulator(SHAPES)
    ones = {k: np.ones(s, np.float32) for k, s in slice_shapes(SHAPES, nested(2)).items()}
    acc.fold(ModelDelta(META, tuple(SparseTensor.from_dense_nonzero(k, v) for k, v in ones.items())), 2.0,
             slice=nested(2))
    acc.fold(ModelDelta(META, ()), 1.0)  # a full-model client that changed nothing
    again = SparseAccumulator.from_state_dict(acc.state_dict())
    for name in SHAPES:
        np.testing.assert_array_equal(again.mean()[name], acc.mean()[name])
    assert acc.mean()["conv.bias"][0] == pytest.approx(2 / 3) and acc.mean()["conv.bias"][5] == 0
