"""prune_channels / reshape_to on every zoo model and on a custom branchy model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models import MODEL_NAMES, build_model, count_macs
from models.structure import StructureError, reshape_to, structure_of
from pruning.structured import channel_importance, macs_fraction, prune_channels

SHAPE = (1, 28, 28)


def widths(model: nn.Module) -> dict[str, int]:
    return {n: (m.out_channels if isinstance(m, nn.Conv1d | nn.Conv2d) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear)}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_zoo_prune_shrinks_macs_rounds_widths_and_reshape_round_trips(name, batch):
    dense = build_model(name).eval()
    before = widths(dense)
    pruned = prune_channels(copy.deepcopy(dense), batch, ratio=0.5, round_to=8)

    after = widths(pruned)
    changed = {k: v for k, v in after.items() if v != before[k]}
    assert count_macs(pruned, SHAPE) < count_macs(dense, SHAPE)
    assert changed, "nothing was pruned"
    assert all(v % 8 == 0 and v > 0 for v in changed.values()), changed
    assert list(after.values())[-1] == 10  # classifier keeps its outputs

    rebuilt = reshape_to(build_model(name), structure_of(pruned))
    rebuilt.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(rebuilt.eval()(batch), pruned(batch))


def test_custom_model_with_depthwise_concat_residual(branchy, randomize_bn, batch):
    dense = randomize_bn(branchy())
    pruned = prune_channels(copy.deepcopy(dense), batch, ratio=0.5, round_to=8)

    assert count_macs(pruned, SHAPE) < count_macs(dense, SHAPE)
    dw = pruned.branch_b[0]
    assert dw.groups == dw.in_channels == dw.out_channels < 32  # stays depthwise, shrunk
    assert pruned.fuse[0].in_channels == pruned.branch_a[0].out_channels + pruned.branch_b[3].out_channels
    assert pruned(batch).shape == (len(batch), 10)
    rebuilt = reshape_to(branchy(), structure_of(pruned)).eval()
    rebuilt.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(rebuilt(batch), pruned(batch))


def test_target_macs_is_reached_with_rounded_widths(batch):
    model = build_model("resnet20").eval()
    dense_macs = count_macs(model, SHAPE)
    prune_channels(model, batch, target_macs=0.5, round_to=8)
    assert 0.3 < macs_fraction(model, dense_macs, SHAPE) <= 0.5
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c % 8 == 0 for c in convs)


def test_layers_restricts_pruning_to_the_given_stage(batch):
    model = build_model("resnet20").eval()
    before = widths(model)
    prune_channels(model, batch, ratio=0.5, round_to=8, layers=[model.layer3])
    after = widths(model)
    changed = {k for k in after if after[k] != before[k]}
    assert changed and all(k.startswith("layer3.") for k in changed), changed


def test_ignored_module_keeps_its_width(batch):
    model = build_model("vgg11_bn").eval()
    first = model.features[0]
    prune_channels(model, batch, ratio=0.5, ignored=[first])
    assert model.features[0].out_channels == 64


def test_training_mode_and_bn_stats_are_preserved(batch):
    model = build_model("resnet20").train()
    stats = model.bn1.running_mean.clone()
    prune_channels(model, batch, ratio=0.25)
    assert model.training
    assert model.bn1.running_mean.shape[0] <= stats.shape[0]
    kept = model.bn1.running_mean
    assert all(bool((stats == v).any()) for v in kept)  # surviving channels' stats untouched


def test_channel_importance_scores_every_group_without_pruning(batch):
    model = build_model("lenet5").eval()
    before = structure_of(model)
    scores = channel_importance(model, batch)
    assert structure_of(model) == before
    assert scores["features.0"].shape == (6,)
    assert "classifier.5" not in scores  # the classifier is never a pruning root


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # neither ratio nor target
        {"ratio": 0.5, "target_macs": 0.5},  # both
        {"ratio": 1.0},  # would remove everything
        {"target_macs": 0.0},
        {"ratio": 0.5, "round_to": 0},
        {"ratio": 0.5, "importance": "nope"},
    ],
)
def test_bad_arguments_raise(kwargs, batch):
    with pytest.raises(ValueError):
        prune_channels(build_model("lenet5"), batch, **kwargs)


def test_reshape_to_rejects_foreign_shapes():
    with pytest.raises(StructureError):
        reshape_to(build_model("lenet5"), structure_of(build_model("resnet20")))
