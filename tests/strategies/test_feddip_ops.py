"""FedDIP: error feedback keeps pruned coordinates learning; the regulariser; masks follow
the cubic schedule and change only at reconfiguration rounds."""

from __future__ import annotations

import torch
from torch import nn

from models import build_model, make_synthetic, train_epochs
from pruning import apply_masks, magnitude_masks, prunable_weights
from strategies.feddip.ops import MaskedForward, feddip_regularizer


def _masked_lenet() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = build_model("lenet5")
    masks = magnitude_masks(prunable_weights(model), 0.3)
    apply_masks(model, masks)
    return model, masks


def _train(model: nn.Module, masks: dict[str, torch.Tensor], *, error_feedback: bool) -> None:
    data = make_synthetic(64, num_classes=10, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with MaskedForward(model, masks, error_feedback=error_feedback):
        train_epochs(model, data, optimizer=opt, batch_size=32, max_steps=3)


def test_error_feedback_updates_pruned_coordinates() -> None:
    model, masks = _masked_lenet()
    before = {n: w.detach().clone() for n, w in prunable_weights(model).items()}
    _train(model, masks, error_feedback=True)
    after = prunable_weights(model)
    changed = sum(int((after[n] != before[n])[~masks[n]].sum()) for n in masks)
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert changed > 0.5 * pruned  # pruned coordinates learn (they left zero)
    assert set(dict(model.named_parameters())) >= set(masks)  # names restored after the block


def test_plain_masking_freezes_pruned_coordinates() -> None:
    model, masks = _masked_lenet()
    _train(model, masks, error_feedback=False)
    for name, w in prunable_weights(model).items():
        assert not w[~masks[name]].any()  # still exactly zero
    # and kept coordinates did learn
    assert any(w[masks[n]].abs().sum() > 0 for n, w in prunable_weights(model).items())


def test_forward_inside_uses_masked_weights() -> None:
    model, masks = _masked_lenet()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        for n, w in prunable_weights(model).items():  # make pruned entries nonzero (dense w)
            w.add_(torch.randn_like(w) * 0.1 * ~masks[n])
        dense_out = model(x)
        with MaskedForward(model, masks):
            masked_out = model(x)
        reference = build_model("lenet5")
        reference.load_state_dict(model.state_dict())
        apply_masks(reference, masks)
        assert torch.allclose(masked_out, reference(x), atol=1e-6)
        assert not torch.allclose(masked_out, dense_out)


def test_regularizer_is_lambda_times_sum_of_masked_l2_norms() -> None:
    model, masks = _masked_lenet()
    weights = prunable_weights(model)
    expected = 1e-3 * sum(torch.linalg.vector_norm(weights[n] * masks[n]) for n in masks)
    reg = feddip_regularizer(masks, 1e-3)
    assert torch.allclose(reg(model), expected)
    with MaskedForward(model, masks):
        assert torch.allclose(reg(model), expected)  # same inside the parametrized block
        reg(model).backward()
    assert weights["features.0.weight"].grad is not None
    assert float(feddip_regularizer(masks, 0.0)(model)) == 0.0
