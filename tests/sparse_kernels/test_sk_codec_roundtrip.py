"""Round trips of the wire codec against the quantisation oracle, and its size."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_kernels import (
    DeltaMeta,
    ModelDelta,
    SparseTensor,
    decode,
    encode,
    peek_meta,
    quantize_values,
)
from sparse_kernels.codec import _HEADER, INDEX_MODES, VALUE_MODES

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def sparse_tensors(draw, name: str = "t") -> SparseTensor:
    shape = tuple(draw(st.lists(st.integers(0, 12), min_size=0, max_size=3)))
    n = math.prod(shape)
    mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    idx = np.flatnonzero(np.array(mask, dtype=bool))
    vals = draw(
        st.lists(
            st.floats(-1e4, 1e4, width=32, allow_subnormal=False), min_size=idx.size, max_size=idx.size
        )
    )
    return SparseTensor(name, shape, idx, np.array(vals, dtype=np.float32))


@st.composite
def model_deltas(draw) -> ModelDelta:
    k = draw(st.integers(0, 4))
    tensors = tuple(draw(sparse_tensors(name=f"layer{i}.weight")) for i in range(k))
    meta = DeltaMeta(
        federation_id=draw(st.text(max_size=12)),
        round=draw(st.integers(0, 2**63)),
        base_version=draw(st.integers(0, 2**40)),
        num_samples=draw(st.integers(0, 10**6)),
        kind=draw(st.sampled_from(["delta", "model", "grad"])),
    )
    return ModelDelta(meta, tensors)


@SETTINGS
@given(
    delta=model_deltas(),
    values=st.sampled_from(VALUE_MODES),
    index=st.sampled_from([m for m in INDEX_MODES if m != "dense"]),
)
def test_decode_encode_equals_quantised_input(delta: ModelDelta, values: str, index: str) -> None:
    out = decode(encode(delta, values=values, index=index))  # type: ignore[arg-type]
    assert out.meta == delta.meta
    assert [t.name for t in out.tensors] == [t.name for t in delta.tensors]
    for sent, got in zip(delta.tensors, out.tensors, strict=True):
        assert got.shape == sent.shape
        np.testing.assert_array_equal(got.indices, sent.indices)
        # the oracle: exactly what quantize_values says (fp32: the input itself)
        np.testing.assert_array_equal(got.values, quantize_values(sent.values, values))
        if values == "fp32":
            np.testing.assert_array_equal(got.values, sent.values)
        elif values == "fp16":
            np.testing.assert_allclose(got.values, sent.values, rtol=2**-10, atol=1e-7)
        elif values == "int8" and sent.nnz:
            step = np.abs(sent.values).max() / 127
            assert np.abs(got.values - sent.values).max() <= step / 2 * 1.0001 + 1e-30


@SETTINGS
@given(delta=model_deltas(), values=st.sampled_from(VALUE_MODES))
def test_quantisation_is_idempotent(delta: ModelDelta, values: str) -> None:
    # ErrorFeedback sends already-quantised values; re-encoding must not move them
    for t in delta.tensors:
        q = quantize_values(t.values, values)
        np.testing.assert_array_equal(quantize_values(q, values), q)


def test_forced_dense_fills_unsent_entries_with_zero() -> None:
    t = SparseTensor("w", (2, 3), np.array([1, 4]), np.array([1.5, -2.0], dtype=np.float32))
    out = decode(encode(ModelDelta(DeltaMeta(), (t,)), values="fp32", index="dense"))
    np.testing.assert_array_equal(out.tensors[0].indices, np.arange(6))
    np.testing.assert_array_equal(out.tensors[0].to_dense(), t.to_dense())


def test_full_model_costs_four_bytes_per_entry_plus_a_small_header() -> None:
    rng = np.random.default_rng(0)
    arrays = {f"layer{i}.conv.weight": rng.normal(size=(64, 64, 3, 3)) for i in range(4)}
    arrays["fc.bias"] = rng.normal(size=10)
    model = ModelDelta.from_dense(arrays)
    data = encode(model, values="fp32")
    n = model.numel
    assert n * 4 < len(data) <= n * 4 + 200
    out = decode(data, expected={k: v.shape for k, v in arrays.items()})
    assert out.meta.kind == "model"
    for name, arr in arrays.items():
        np.testing.assert_array_equal(out.by_name()[name].to_dense(), arr.astype(np.float32))
    out.tensors[0].values[0] = 1.0  # decoded arrays are writable copies, not views of bytes


@pytest.mark.parametrize("density", [0.001, 0.01, 0.1])
def test_rice_index_bits_within_three_percent_of_bound(density: float) -> None:
    # the target, on a ResNet-32-sized flat tensor with a uniformly random support
    rng = np.random.default_rng(1)
    n = 464_154
    k = round(density * n)
    idx = np.sort(rng.choice(n, k, replace=False))
    t = SparseTensor("w", (n,), idx, np.ones(k, dtype=np.float32))
    only_header = len(encode(ModelDelta(DeltaMeta(), (SparseTensor("w", (n,), idx[:0], idx[:0]),)), values="ternary"))
    data = encode(ModelDelta(DeltaMeta(), (t,)), values="ternary", index="rice")
    index_bits = 8 * (len(data) - only_header - (k + 7) // 8)
    bound = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
    assert bound <= index_bits <= 1.03 * bound


def test_auto_picks_the_smallest_index_encoding() -> None:
    rng = np.random.default_rng(2)
    n = 20_000
    for density in (0.01, 0.5, 1.0):
        k = round(density * n)
        idx = np.sort(rng.choice(n, k, replace=False))
        delta = ModelDelta(DeltaMeta(), (SparseTensor("w", (n,), idx, np.ones(k)),))
        sizes = {m: len(encode(delta, values="fp16", index=m)) for m in INDEX_MODES}  # type: ignore[arg-type]
        assert sizes["auto"] <= min(sizes.values())


def test_peek_meta_reads_metadata_only() -> None:
    meta = DeltaMeta("fed-1", 7, 3, 120, "delta")
    data = encode(ModelDelta(meta, ()))
    assert peek_meta(data) == meta
    assert data[: 4] == b"FSDL" and len(data) > _HEADER.size


def test_sparse_tensor_helpers() -> None:
    arr = np.array([[0.0, 2.0], [0.0, -1.0]], dtype=np.float32)
    nz = SparseTensor.from_dense_nonzero("a", arr)
    assert (nz.nnz, nz.numel, nz.density) == (2, 4, 0.5)
    np.testing.assert_array_equal(nz.to_dense(), arr)
    full = SparseTensor.from_dense("a", arr)
    assert full.nnz == 4 and full.indices.dtype == np.int64 and full.values.dtype == np.float32
    with pytest.raises(ValueError, match="indices but"):
        SparseTensor("a", (4,), np.array([0, 1]), np.array([1.0]))
