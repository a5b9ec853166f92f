"""The mask strategies' agent halves take their mask from the task's mask artifact, and
FedTiny's selection broadcast ("candidate k") is the selected candidate applied locally
plus a patch of the averaged BN statistics only.

Mutations killed (named at each test): `strategies.masking.agent_masks` reading the
downloaded zeros instead of the artifact; `make_broadcast` not masking the change (the
patch carries the zeroing of the pruned weights again) or not applying the mask after the
patch (what agents hold keeps the pruned weights).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from coordinator.broadcast import make_broadcast
from models import make_synthetic
from models.state import build_from_state, is_bn_stat
from pruning.masks import masked_weight_names
from sparse_kernels import decode
from sparse_kernels.masks import encode_masks
from strategies import RoundResult
from strategies.fedtiny.ops import fedtiny_weight_names, pool_from_state
from strategies.fedtiny.server import FedTiny
from strategies.masking import MASK_PARAM, apply_np_masks


def _artifact_case(h: Any, names_of: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Any]:
    """lenet5 weights under a random 30% mask, with one kept weight per layer at exactly 0
    (what fp16 underflow or a regrown coordinate the top-k patch did not send yet leaves)."""
    w = h.weights_of("lenet5")
    model = build_from_state("lenet5", w, in_channels=1, num_classes=10)
    rng = np.random.default_rng(1)
    masks = {n: rng.random(w[n].shape) < 0.3 for n in names_of(model)}
    held = apply_np_masks(w, masks)
    for n, m in masks.items():
        held[n].reshape(-1)[np.flatnonzero(m)[0]] = 0.0  # kept, but 0 in what was downloaded
    return masks, held, build_from_state("lenet5", held, in_channels=1, num_classes=10)


@pytest.mark.parametrize(("strategy", "params", "names_of"), [
    ("feddip", {"lam": 1e-3}, masked_weight_names),
    ("autoflip", {"pruned": True}, masked_weight_names),
    ("fedtiny", {"phase": "train"}, fedtiny_weight_names),
])
def test_agent_halves_take_the_mask_from_the_artifact_not_the_zeros(h: Any, strategy: str, params: dict[str, Any],
                                                                     names_of: Any) -> None:
    """Kills: `agent_masks` reading `weights != 0` (the kept weight at 0 would be pruned)."""
    # Arrange
    masks, held, model = _artifact_case(h, names_of)
    artifact = encode_masks(masks)
    task = h.task_for(strategy, {**params, MASK_PARAM: artifact})

    # Act
    hooks = h.task_hooks(task, model, held, make_synthetic(16))

    # Assert: the masks the hooks train and upload under are the artifact's, bit for bit
    used = hooks.context.masks if strategy == "feddip" else hooks.upload_support
    if strategy == "feddip":  # the masked forward covers the layers with pruned entries
        used = {n: m.cpu().numpy() for n, m in used.items()}
        assert set(used) == {n for n, m in masks.items() if not m.all()}
    else:
        assert set(used) == set(masks)
    for n in used:
        np.testing.assert_array_equal(np.asarray(used[n]), masks[n])


def test_a_mask_of_another_model_is_refused(h: Any) -> None:
    masks, held, model = _artifact_case(h, masked_weight_names)
    wrong = encode_masks({n: m.T if m.ndim == 2 else m for n, m in masks.items()})
    with pytest.raises(ValueError, match="shape"):
        h.task_hooks(h.task_for("feddip", {"lam": 0.0, MASK_PARAM: wrong}), model, held, make_synthetic(16))


@pytest.mark.parametrize(("density", "values"), [(1.0, "fp32"), (0.1, "fp16")])
def test_fedtiny_selection_broadcast_is_candidate_k_plus_bn_statistics(h: Any, density: float, values: str) -> None:
    """Oracle: the old full patch's model, the candidate's mask applied with numpy and the
    averaged BN statistics installed. Kills: make_broadcast without `masks` (the patch then
    carries the zeroing of ~70% of the weights) and a make_broadcast that does not apply the
    mask after the patch (at density 0.1 the pruned weights would stay)."""
    # Arrange: resnet20 (BN), the selection round closing with candidate 1 chosen
    w = h.weights_of("resnet20")
    s = FedTiny(density=0.3, pool_size=2, seed=0)
    ctx = dataclasses.replace(h.context(2, 5, model="resnet20"), aux={"aux/loss": np.array([3.0, 1.0], np.float32)})
    bn_keys = [k for k in w if is_bn_stat(k)]
    state = {f"bn/{c}/{k}": (w[k] + 0.25 * (c + 1)).astype(np.float32) for c in (0, 1) for k in bn_keys}
    result = s.aggregate(ctx, w, {}, state)
    names = fedtiny_weight_names(build_from_state("resnet20", w, in_channels=1, num_classes=10))
    candidate = pool_from_state(w, names, 0.3, 2, 0)[1]
    oracle = {k: np.where(candidate[k], v, np.float32(0)) if k in candidate else v for k, v in w.items()}
    oracle.update({k: state[f"bn/1/{k}"] for k in bn_keys})

    # Act: the broadcast the service makes with the version's masks
    masks = {k.removeprefix("mask/"): v.astype(bool) for k, v in result.state.items() if k.startswith("mask/")}
    cast = make_broadcast("f", 3, w, {}, RoundResult(result.weights, state=result.state), density=density,
                          values=values, masks=masks)  # type: ignore[arg-type]

    # Assert: the patch moves BN statistics only; held weights are exactly the candidate applied
    assert cast.patch is not None
    sent = {t.name for t in decode(cast.patch).tensors if t.nnz}
    assert sent and sent <= set(bn_keys)
    assert len(cast.patch) < 0.05 * sum(v.size for v in w.values()) * 4
    for k in candidate:
        np.testing.assert_array_equal(cast.weights[k], oracle[k])
    for k in bn_keys:
        if values == "fp32":
            np.testing.assert_array_equal(cast.weights[k], oracle[k])
        else:  # through an fp16 patch the statistics are rounded, the remainder in the residual
            np.testing.assert_allclose(cast.weights[k], oracle[k], rtol=2e-3, atol=2e-3)
