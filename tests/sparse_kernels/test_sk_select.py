"""Top-k selection and error feedback (mass conservation)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_kernels import DeltaMeta, ErrorFeedback, decode, encode, energy_density, select_topk, topk_mask


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


def _k(density: float, numel: int) -> int:
    return max(1, int(np.ceil(density * numel - 1e-9)))  # the count select_topk sends at that density


def _energy_oracle(values: np.ndarray, energy: float, cap: float) -> int:
    """The fewest largest coordinates whose squares reach `energy` of the total, at most
    the cap's count: a plain loop over the sorted squares."""
    squares = sorted((float(v) ** 2 for v in values), reverse=True)
    k_cap = min(len(squares), max(1, int(np.ceil(cap * len(squares) - 1e-9))))
    total, run = sum(squares), 0.0
    for k, s in enumerate(squares[:k_cap], start=1):
        run += s
        if run >= energy * total * (1 - 1e-12):
            return k
    return k_cap


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=2, max_size=60),
       st.floats(0.05, 1.0), st.floats(0.05, 1.0))
def test_energy_density_is_the_fewest_coordinates_carrying_the_share(xs: list[float], energy: float,
                                                                     cap: float) -> None:
    # Mutations killed: energy of |x| instead of x², an off-by-one in k, the cap ignored,
    # the energy ignored (always the cap)
    a = np.asarray(xs, dtype=np.float32)
    if not np.any(a):
        return
    d = energy_density({"w": a[: len(a) // 2], "v": a[len(a) // 2 :]}, energy, cap=cap)
    assert _k(d, a.size) == _energy_oracle(a, energy, cap)
    assert d <= cap + 1e-12


def test_energy_density_sends_few_for_a_concentrated_change_and_respects_support_and_small_tensors() -> None:
    rng = np.random.default_rng(0)
    spiky = np.zeros(10_000, dtype=np.float32)
    spiky[rng.choice(10_000, 50, replace=False)] = 1.0
    spiky += rng.normal(0, 1e-3, 10_000).astype(np.float32)
    diffuse = rng.normal(0, 1, 10_000).astype(np.float32)
    assert energy_density({"w": spiky}, 0.9, cap=0.1) < 0.006  # ~45 of the 50 spikes
    assert energy_density({"w": diffuse}, 0.9, cap=0.1) == pytest.approx(0.1)  # capped
    # the small tensor is sent whole and does not count; the support's zeros are ranked, never needed
    support = {"w": np.arange(10_000) < 5_000}
    d = energy_density({"w": diffuse, "b": np.full(10, 1e3, np.float32)}, 0.5, support=support, min_dense_numel=1024)
    half = np.sort(np.square(diffuse[:5_000].astype(np.float64)))[::-1]
    assert _k(d, 10_000) == int(np.searchsorted(np.cumsum(half), 0.5 * half.sum())) + 1
    assert energy_density({"w": np.zeros(100, np.float32)}, 0.9, cap=0.5) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        energy_density({"w": diffuse}, 0.0)


def test_error_feedback_with_energy_sends_the_adaptive_share_and_conserves_mass() -> None:
    rng = np.random.default_rng(1)
    fb = ErrorFeedback()
    meta = DeltaMeta()
    sent = np.zeros(20_000, np.float32)
    total = np.zeros(20_000, np.float32)
    for _ in range(3):
        change = rng.normal(0, 1, 20_000).astype(np.float32) * (rng.random(20_000) < 0.02)
        expected = _k(energy_density({"w": change + fb.residual.get("w", 0)}, 0.8, cap=0.1), 20_000)
        (t,) = fb.compress({"w": change}, density=0.1, meta=meta, values="fp32", energy=0.8).tensors
        assert len(t.indices) == expected < 2_000  # adaptive, below the 10 % cap
        sent[t.indices] += t.values
        total += change
    np.testing.assert_allclose(sent + fb.residual["w"].reshape(-1), total, atol=1e-5)
