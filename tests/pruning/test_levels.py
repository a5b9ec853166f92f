"""Width levels against their oracle: a level's sub-model computes exactly what the full
model computes with the dropped channels' inputs zeroed (eval mode), on models with
residual adds, BN and flatten → linear."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.state import build_from_state, seeded_weights
from pruning.levels import level_slices, recalibrate_bn
from sparse_kernels.reshape import apply_reshape

MODELS = [("fedavg_cnn", 1, 28), ("resnet20", 3, 32), ("vgg11_bn", 3, 32), ("lenet5", 1, 28),
          ("mobilenetv2_small", 1, 28),  # depthwise convs + inverted residual adds
          ("mobilenetv2_small", 3, 32),
          ("sensor_cnn", 3, 32),  # Conv1d/BatchNorm1d over the flattened window
          ("sensor_mlp", 1, 28)]


def zero_dropped_inputs(weights, reshape):
    """The full weights with every consumer's inputs from dropped channels set to zero:
    dimensions ≥ 1 of a tensor are its inputs; the outputs (dim 0) stay, unused."""
    out = {k: v.copy() for k, v in weights.items()}
    for name, dims in reshape.items():
        for axis, keep in enumerate(dims):
            if axis == 0 or keep is None:
                continue
            dropped = np.setdiff1d(np.arange(out[name].shape[axis]), keep)
            index = [slice(None)] * out[name].ndim
            index[axis] = dropped
            out[name][tuple(index)] = 0.0
    return out


@pytest.mark.parametrize("model,channels,size", MODELS)
@pytest.mark.parametrize("rule", ["first", "importance", "rolling"])
def test_sub_model_equals_the_full_model_with_dropped_inputs_zeroed(model, channels, size, rule):
    weights = seeded_weights(model, 3, in_channels=channels, num_classes=10)
    rng = np.random.default_rng(0)
    for k in weights:  # BN statistics other than 0/1, so that slicing them wrongly shows
        if k.endswith(("running_mean", "running_var")):
            weights[k] = rng.uniform(0.5, 1.5, size=weights[k].shape).astype(np.float32)
    x = torch.randn(4, channels, size, size, generator=torch.Generator().manual_seed(1))
    for level in level_slices(model, weights, [0.5, 0.25], rule=rule, rnd=5, in_channels=channels):
        assert level.reshape, "a narrower level must drop channels"
        sub = build_from_state(model, apply_reshape(weights, level.reshape), in_channels=channels, num_classes=10).eval()
        full = build_from_state(model, zero_dropped_inputs(weights, level.reshape), in_channels=channels,
                                num_classes=10).eval()
        with torch.no_grad():
            torch.testing.assert_close(sub(x), full(x), rtol=1e-4, atol=1e-5)


def test_first_k_levels_are_nested_and_round_to_the_simd_block():
    weights = seeded_weights("fedavg_cnn", 0, in_channels=1, num_classes=10)
    wide, narrow = level_slices("fedavg_cnn", weights, [0.5, 0.25])
    for name, dims in narrow.reshape.items():
        for keep_narrow, keep_wide in zip(dims, wide.reshape[name], strict=True):
            if keep_narrow is not None:
                assert set(keep_narrow) <= set(keep_wide or keep_narrow)
    assert narrow.shapes["features.0.weight"][0] == 8 and wide.shapes["features.0.weight"][0] == 16  # 32 channels
    assert narrow.shapes["classifier.3.weight"][0] == 10  # the classifier keeps its outputs
    assert narrow.macs < wide.macs < level_slices("fedavg_cnn", weights, [1.0])[0].macs


def test_rolling_windows_move_with_the_round_and_wrap():
    weights = seeded_weights("fedavg_cnn", 0, in_channels=1, num_classes=10)
    at = {rnd: level_slices("fedavg_cnn", weights, [0.5], rule="rolling", rnd=rnd)[0].reshape["features.0.bias"][0]
          for rnd in (0, 1, 20)}
    assert at[0] == list(range(16)) and at[1] == list(range(1, 17))
    assert at[20] == [*range(0, 4), *range(20, 32)]  # 16 channels from 20, wrapping at 32


def test_recalibrate_bn_estimates_the_statistics_of_the_slice_inputs():
    weights = seeded_weights("resnet20", 0, in_channels=3, num_classes=10)
    net = build_from_state("resnet20", weights, in_channels=3, num_classes=10)
    net.eval()
    batches = [torch.randn(16, 3, 32, 32) * 3 + 1 for _ in range(2)]
    assert recalibrate_bn(net, batches)
    assert not net.training  # the mode is restored
    assert float(net.bn1.running_var.mean()) > 2.0  # unit-variance defaults replaced by the data's
    plain = seeded_weights("fedavg_cnn", 0, in_channels=1, num_classes=10)
    assert not recalibrate_bn(build_from_state("fedavg_cnn", plain, in_channels=1, num_classes=10), batches[:1])
