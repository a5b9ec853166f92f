"""Top-k selection and error feedback (mass conservation)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_kernels import DeltaMeta, ErrorFeedback, decode, encode, select_topk, topk_mask


def test_topk_mask_picks_largest_magnitudes_sorted() -> None:
    a = np.array([[0.1, -5.0, 3.0], [0.0, 4.0, -0.2]], dtype=np.float32)
    np.testing.assert_array_equal(topk_mask(a, 3), [1, 2, 4])
    assert topk_mask(a, 0).size == 0
    np.testing.assert_array_equal(topk_mask(a, 99), np.arange(6))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=60), st.integers(0, 70))
def test_topk_mask_matches_sort_oracle(xs: list[float], k: int) -> None:
    a = np.array(xs, dtype=np.float32)
    got = topk_mask(a, k)
    assert got.size == min(k, a.size) and np.all(np.diff(got) > 0)
    if 0 < got.size < a.size:
        # every kept magnitude >= every dropped one (ties may go either way)
        dropped = np.setdiff1d(np.arange(a.size), got)
        assert np.abs(a[got]).min() >= np.abs(a[dropped]).max()


def test_select_topk_per_tensor_global_support_and_small_tensors() -> None:
    rng = np.random.default_rng(0)
    dense = {"w": rng.normal(size=(10, 10)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    per = select_topk(dense, density=0.1, min_dense_numel=4)
    assert per["w"].nnz == 10 and per["b"].nnz == 4  # b sent whole
    glob = select_topk({"w": dense["w"], "x": 100 * dense["w"]}, density=0.1, scope="global")
    assert glob["w"].nnz == 0 and glob["x"].nnz == 20  # the larger tensor wins every slot
    mask = np.zeros((10, 10), dtype=bool)
    mask[0] = True
    sup = select_topk(dense, density=0.5, support={"w": mask})
    assert sup["w"].nnz == 10 and np.all(sup["w"].indices < 10)  # capped by the support
    zeros = select_topk({"z": np.zeros(8)}, density=1.0)
    assert zeros["z"].nnz == 0  # exact zeros are never sent
    with pytest.raises(ValueError, match="density"):
        select_topk(dense, density=1.5)


@pytest.mark.parametrize("values", ["fp32", "fp16", "int8", "ternary"])
@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_error_feedback_conserves_mass(values: str, scope: str) -> None:
    rng = np.random.default_rng(3)
    shapes = {"conv": (8, 4, 3, 3), "fc": (10, 16), "bias": (10,)}
    ef = ErrorFeedback()
    total_delta = {n: np.zeros(s, dtype=np.float64) for n, s in shapes.items()}
    total_sent = {n: np.zeros(s, dtype=np.float64) for n, s in shapes.items()}
    for rnd in range(12):
        delta = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
        md = ef.compress(delta, density=0.05, meta=DeltaMeta(round=rnd), values=values, scope=scope)
        received = decode(encode(md, values=values))  # type: ignore[arg-type]
        for t in received.tensors:
            total_sent[t.name] += t.to_dense()
        for n in shapes:
            total_delta[n] += delta[n]
    for n in shapes:
        np.testing.assert_allclose(
            total_sent[n] + ef.state_dict()[n], total_delta[n], rtol=1e-5, atol=1e-4
        )
    # and the residual is what was not sent: some of it is nonzero at 5% density
    assert any(np.abs(r).max() > 0 for r in ef.state_dict().values())


def test_error_feedback_sent_values_are_what_the_server_decodes() -> None:
    rng = np.random.default_rng(4)
    ef = ErrorFeedback()
    md = ef.compress({"w": rng.normal(size=500)}, density=0.1, meta=DeltaMeta(), values="int8")
    got = decode(encode(md, values="int8"))
    np.testing.assert_array_equal(got.tensors[0].values, md.tensors[0].values)


def test_error_feedback_drops_residual_off_support_and_persists() -> None:
    rng = np.random.default_rng(5)
    mask = rng.random(100) < 0.3
    ef = ErrorFeedback()
    ef.compress({"w": rng.normal(size=100)}, density=0.05, meta=DeltaMeta(), support={"w": mask})
    state = ef.state_dict()
    assert np.all(state["w"][~mask] == 0) and np.any(state["w"][mask] != 0)
    other = ErrorFeedback()
    other.load_state_dict(state)
    d = {"w": rng.normal(size=100)}
    a = ef.compress(d, density=0.05, meta=DeltaMeta(), support={"w": mask})
    b = other.compress(d, density=0.05, meta=DeltaMeta(), support={"w": mask})
    np.testing.assert_array_equal(a.tensors[0].indices, b.tensors[0].indices)
    np.testing.assert_array_equal(a.tensors[0].values, b.tensors[0].values)
