"""Adaptive dynamic pruning as a strategy: gated models travel as weights, the static
export folds the mean gates in exactly, rarely used channels are pruned first, agents'
gate statistics are per-sample means, and one real federation ends with a plain,
channel-pruned model that exports to ONNX."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from edge_agent.agent import EdgeAgent
from edge_agent.local import run_task
from models import ImageDataset, build_model, count_macs, make_synthetic
from models.gating import (
    channel_usage,
    gate_model,
    gated_layers,
    gated_macs_fraction,
    gated_widths,
    mean_gate,
    reset_gate_stats,
    ungate,
)
from models.state import build_from_state, load_numpy_state, seeded_weights, to_numpy_state
from models.training import iterate_batches
from sparse_kernels import ErrorFeedback, SparseAccumulator, decode
from strategies import STRATEGIES, build_strategy
from strategies.base import AUX_PREFIX, RoundContext
from strategies.dynamic.common import stat_key
from strategies.dynamic.server import DynamicPruning, aux_shapes_for
from tests.helpers import ADMIN


def _float_keys(model: nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if v.is_floating_point()}


def _initial(model: str = "fedavg_cnn", in_channels: int = 1, **params: Any) -> dict[str, np.ndarray]:
    w0 = seeded_weights(model, 0, in_channels=in_channels, num_classes=10)
    return DynamicPruning(**params).initial_weights(w0, RoundContext(0, 2, model, in_channels, 10, None, 0))


def test_registered_and_gates_every_conv_but_the_first() -> None:
    assert STRATEGIES["dynamic"] is DynamicPruning
    with pytest.raises(ValueError):
        build_strategy("dynamic", {"export_macs": 0.0})
    w = _initial("resnet20", 3)
    widths = gated_widths(w)
    assert "conv1" not in widths and len(widths) == 20  # 18 block convs + 2 shortcuts
    assert w["layer1.0.conv1.gate.top_k"] == round(0.7 * 16)
    assert not any(k.endswith(("usage", "samples", "gate_sum")) for k in w)  # statistics do not travel
    assert set(DynamicPruning().aux_shapes(1, w, {})) == set(aux_shapes_for(widths))
    torch.manual_seed(123)  # the gates' initialisation is seeded: not the global RNG's
    again = _initial("resnet20", 3)
    for k in w:
        np.testing.assert_array_equal(again[k], w[k])


@pytest.mark.parametrize("zero_residual", [True, False])
def test_resnet32_starts_trainable_with_zero_residual_branches(zero_residual: bool) -> None:
    """The gates' gain (bias 1, Kaiming) compounds along ResNet-32's residual path: at init
    the logits reach ~1e9 unless each branch's last BN starts at γ = 0 (the default).
    Kills: dropping `zero_init_residual` (logits explode), zeroing a shortcut's BN instead
    (the branches still add their gain), or not passing the param to the agents' rebuild."""
    w = _initial("resnet32", 1, zero_residual=zero_residual)
    block_bns = [k for k in w if k.endswith(".conv2.bn.weight")]
    assert len(block_bns) == 15  # 3 stages × 5 blocks; the gated BN lives in the wrapper
    assert all((w[k] == 0).all() for k in block_bns) == zero_residual
    assert all((w[k] == 1).all() for k in w if ".shortcut." in k and k.endswith("bn.weight"))
    from strategies.dynamic.common import initial_weights_from_params

    w0 = seeded_weights("resnet32", 0, in_channels=1, num_classes=10)
    ctx = RoundContext(0, 2, "resnet32", 1, 10, None, 0)
    agent_side = initial_weights_from_params({"zero_residual": zero_residual}, w0, ctx)
    for k in w:
        np.testing.assert_array_equal(agent_side[k], w[k])
    model = build_from_state("resnet32", w, in_channels=1, num_classes=10).train()
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    if zero_residual:
        assert float(logits.abs().max()) < 10.0
    else:
        assert float(logits.abs().max()) > 1e3  # the divergence the option exists for


@pytest.mark.parametrize("lossy", [False, True])  # True: the model travelled as fp16
def test_gated_model_round_trips_through_its_weights(lossy: bool) -> None:
    torch.manual_seed(0)
    model = gate_model(build_model("resnet20", in_channels=3), 0.55, skip=("conv1", "layer2.0.shortcut.0"))
    w = to_numpy_state(model)
    if lossy:  # the gates' widths are small integers: exact in fp16
        w = {k: v.astype(np.float16).astype(np.float32) for k, v in w.items()}
        load_numpy_state(model, w)
    rebuilt = build_from_state("resnet20", w, in_channels=3, num_classes=10)
    assert {n: m.gate.keep for n, m in gated_layers(rebuilt).items()} == {
        n: m.gate.keep for n, m in gated_layers(model).items()}
    assert "conv1" not in gated_layers(rebuilt) and "layer2.0.shortcut.0" not in gated_layers(rebuilt)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # train mode: in eval, a fresh gated ResNet (default BN statistics) overflows
        torch.testing.assert_close(rebuilt.train()(x), model.train()(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "in_channels", "ratio"),
    [
        ("fedavg_cnn", 1, 1.0),  # no BN: ḡ folds into the conv's filters and bias
        ("fedavg_cnn", 1, 0.5),  # half the channels always dropped: folded to exactly 0
        ("resnet20", 3, 0.7),  # BN and residual adds: ḡ folds into the BN affine
    ],
)
def test_ungate_is_exact_for_constant_gates(name: str, in_channels: int, ratio: float) -> None:
    torch.manual_seed(0)
    model = gate_model(build_model(name, in_channels=in_channels), ratio)
    for layer in gated_layers(model).values():  # g = ReLU(0·s + b) = b: the same for every sample
        with torch.no_grad():
            layer.gate.fc.weight.zero_()
            layer.gate.fc.bias.copy_(torch.rand(layer.conv.out_channels) + 0.1)  # distinct: no top-k ties
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    size = 28 if in_channels == 1 else 32
    x = torch.randn(6, in_channels, size, size)
    reset_gate_stats(model)
    with torch.no_grad():
        gated_out = model(x)
    gates = mean_gate(model)
    for n, layer in gated_layers(model).items():
        b = layer.gate.fc.bias.detach().double()
        kept = torch.topk(b, layer.gate.keep).indices
        expected = torch.zeros_like(b)
        expected[kept] = b[kept]
        torch.testing.assert_close(gates[n], expected)  # ḡ = E[g·keep]
    plain = ungate(model, gates)
    assert not gated_layers(plain)
    assert _float_keys(plain) == _float_keys(build_model(name, in_channels=in_channels))
    fresh = build_from_state(name, to_numpy_state(plain), in_channels=in_channels, num_classes=10).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), gated_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", ["usage", "gate_l2"])
def test_export_prunes_never_used_channels_first_and_meets_the_macs_target(rank: str) -> None:
    w = _initial("fedavg_cnn")
    rng = np.random.default_rng(0)
    unused = np.sort(rng.choice(64, size=24, replace=False))
    gates = np.ones(64, dtype=np.float32)
    gates[unused] = 0.0
    # make the unused channels the largest by plain magnitude: only ḡ can rank them last
    w["features.3.conv.weight"][unused] *= 10  # gated keys: the conv is in the wrapper
    fc = w["classifier.1.weight"].reshape(512, 64, 25)  # (out, channel, 5·5 positions)
    fc[:, unused] *= 10
    ctx = RoundContext(2, 2, "fedavg_cnn", 1, 10, None, 2)
    s = DynamicPruning(export_macs=0.5, export_rank=rank)  # type: ignore[arg-type]
    out = s.export(ctx, w, {"features.3": gates}, {"features.3": gates})  # never kept: ḡ = usage = 0
    assert set(out) == _float_keys(build_model("fedavg_cnn"))
    conv = out["features.3.weight"]
    assert conv.shape[0] % 8 == 0 and conv.shape[0] <= 40
    assert np.abs(conv).reshape(conv.shape[0], -1).sum(1).min() > 0  # no folded-to-zero filter survived
    plain = build_from_state("fedavg_cnn", out, in_channels=1, num_classes=10)
    assert count_macs(plain, (1, 28, 28)) <= 0.5 * count_macs(build_model("fedavg_cnn"), (1, 28, 28))


def _kept_channels(folded_bias: np.ndarray, exported_bias: np.ndarray) -> list[int]:
    """Which original channels the exported ones are: each channel's bias (with its ḡ
    folded in) is distinct, and the export keeps it exactly (its inputs may be cut)."""
    match = np.abs(exported_bias[:, None] - folded_bias[None, :])  # (kept, original)
    assert np.allclose(match.min(1), 0.0, atol=1e-7)
    return sorted(int(j) for j in match.argmin(1))


@pytest.mark.parametrize("rank", ["usage", "gate_l2"])
def test_export_keeps_exactly_the_most_used_channels(rank: str) -> None:
    # Kills (with rank="usage", the default): ranking by ḡ × L2 or plain L2, which keep the
    # least used here, and keeping the least used. The "gate_l2" case shows the two differ.
    w = _initial("fedavg_cnn")
    rng = np.random.default_rng(1)
    usage = (rng.permutation(64) / 64).astype(np.float32)  # distinct: no tie-break needed
    gates = (1.05 - usage).astype(np.float32)  # the least used have the largest mean gate...
    w["features.3.conv.weight"] *= (2.0 - usage)[:, None, None, None]  # ...and the largest group L2
    w["classifier.1.weight"].reshape(512, 64, 25)[:] *= (2.0 - usage)[None, :, None]
    w["features.3.conv.bias"] = rng.permutation(np.linspace(0.1, 1.0, 64)).astype(np.float32)
    folded = w["features.3.conv.bias"] * gates  # what ungate makes of each channel's bias
    ctx = RoundContext(2, 2, "fedavg_cnn", 1, 10, None, 2)
    assert DynamicPruning().export_rank == "usage"
    out = DynamicPruning(export_macs=0.5, export_rank=rank).export(  # type: ignore[arg-type]
        ctx, w, {"features.3": gates}, {"features.3": usage})
    kept = _kept_channels(folded, out["features.3.bias"])
    k = len(kept)
    assert 8 <= k < 64 and k % 8 == 0
    most_used = sorted(int(j) for j in np.argsort(-usage)[:k])
    if rank == "usage":
        assert kept == most_used
    else:
        assert kept == sorted(int(j) for j in np.argsort(usage)[:k])  # ḡ × L2 keeps the least used
    assert np.abs(out["features.3.bias"] - folded[kept]).max() < 1e-7  # ḡ folded in, as before


@pytest.mark.parametrize(("usage", "l2", "order"), [
    ([0.2, 0.9, 0.5], [3.0, 1.0, 2.0], [0, 2, 1]),  # usage decides, whatever the magnitude
    ([0.5, 0.5, 0.1], [1.0, 2.0, 9.0], [2, 0, 1]),  # a tie in usage: the larger L2 ranks higher
    ([1.0, 1.0, 1.0], [2.0, 3.0, 1.0], [2, 0, 1]),  # no statistics (all used): plain L2
])
def test_usage_scores_rank_by_usage_then_l2(usage: list[float], l2: list[float], order: list[int]) -> None:
    # Kills: ties broken by index (or against L2), usage ignored, the order inverted.
    from strategies.dynamic.ops import usage_scores

    scores = usage_scores(torch.tensor(usage), torch.tensor(l2, dtype=torch.float64))
    assert scores.dtype == torch.float64
    assert torch.argsort(scores).tolist() == order  # least kept first


def test_export_rank_is_checked() -> None:
    with pytest.raises(ValueError, match="export_rank"):
        DynamicPruning(export_rank="random")  # type: ignore[arg-type]


def _dataset(parts: list[ImageDataset]) -> ImageDataset:
    return ImageDataset(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                        10, parts[0].name)


def test_agent_statistics_are_sample_weighted_means_over_the_training_samples(h: Any) -> None:
    w = _initial("lenet5")
    task = h.task_for("dynamic", {}, model="lenet5", batch_size=16, lr=1e-9, momentum=0.0)  # a frozen model
    datasets = [make_synthetic(48, seed=1), make_synthetic(80, seed=2)]  # 3 and 5 steps, every sample once
    shapes = {**{k: v.shape for k, v in w.items()}, **aux_shapes_for(gated_widths(w))}
    acc = SparseAccumulator(shapes)
    for data in datasets:
        result = run_task(task, w, data, ErrorFeedback())
        assert result.report.num_samples == len(data)
        acc.fold_bytes(result.body, weight=result.report.num_samples)  # as the service folds
    mean = acc.mean()
    # oracle: the gated model's statistics over all 128 samples at once
    model = build_from_state("lenet5", w, in_channels=1, num_classes=10).train()
    reset_gate_stats(model)
    with torch.no_grad():
        for x, _ in iterate_batches(_dataset(datasets), 16):
            model(x)
    (layer,) = gated_layers(model)
    assert int(model.get_submodule(layer).gate.samples) == 128
    np.testing.assert_allclose(mean[AUX_PREFIX + stat_key("gate", layer)], mean_gate(model)[layer], atol=1e-5)
    np.testing.assert_allclose(mean[AUX_PREFIX + stat_key("usage", layer)], channel_usage(model)[layer], atol=1e-6)
    np.testing.assert_allclose(mean[AUX_PREFIX + stat_key("macs", layer)], [gated_macs_fraction(model)[layer]],
                               atol=1e-6)
    assert mean[AUX_PREFIX + stat_key("usage", layer)].sum() == pytest.approx(round(0.7 * 16))  # top_k per sample


def test_hooks_report_nothing_for_the_exported_plain_model(h: Any) -> None:
    w = seeded_weights("fedavg_cnn", 0, in_channels=1, num_classes=10)
    model = build_from_state("fedavg_cnn", w, in_channels=1, num_classes=10)
    hooks = h.task_hooks(h.task_for("dynamic", {}, model="fedavg_cnn"), model, w, make_synthetic(16))
    assert hooks.aux is None
    res = DynamicPruning().aggregate(RoundContext(3, 3, "fedavg_cnn", 1, 10, None, 2), w, {}, {})
    assert not res.structure_changed and res.metrics == {"exported": 1}  # fine-tuning: plain FedAvg


def test_metrics_and_state_from_the_averaged_statistics() -> None:
    w = _initial("fedavg_cnn")
    aux = {AUX_PREFIX + stat_key("gate", "features.3"): np.full(64, 0.5, np.float32),
           AUX_PREFIX + stat_key("usage", "features.3"): np.full(64, 45 / 64, np.float32),
           AUX_PREFIX + stat_key("macs", "features.3"): np.array([45 / 64], np.float32)}
    ctx = RoundContext(1, 3, "fedavg_cnn", 1, 10, None, 2, aux=aux)
    res = DynamicPruning().aggregate(ctx, w, {}, {})
    assert not res.structure_changed and res.metrics["exported"] == 0
    assert res.metrics["density"] == pytest.approx(45 / 64)
    assert res.metrics["gated_conv_macs"] == pytest.approx(45 / 64)
    # conv2 is 5.12 of the 6.57 MMACs: the rest stays dense, the gate adds 32·64
    dense = res.metrics["dense_macs"]
    assert res.metrics["effective_macs"] == pytest.approx((dense - 5_120_000 * (1 - 45 / 64) + 32 * 64) / dense)
    assert res.state[stat_key("gate", "features.3")][0] == 0.5  # kept for a round without reports
    later = DynamicPruning().aggregate(dataclasses.replace(ctx, round=2, aux={}), res.weights, {}, res.state)
    assert later.metrics["density"] == pytest.approx(45 / 64)


@pytest.mark.parametrize(("finetune_rounds", "export_round"), [(0, 3), (1, 2)])  # then plain FedAvg
def test_the_export_round(finetune_rounds: int, export_round: int) -> None:
    w = _initial("fedavg_cnn")
    s = DynamicPruning(finetune_rounds=finetune_rounds)
    for rnd in range(1, 4):
        res = s.aggregate(RoundContext(rnd, 3, "fedavg_cnn", 1, 10, None, 2), w, {}, {})
        assert res.structure_changed == (rnd == export_round)
        assert res.metrics["exported"] == int(rnd >= export_round)
        if rnd == export_round:  # no statistics reported at all: the gates go unscaled
            assert res.metrics["export_without_stats"] == 1 and not gated_widths(res.weights)
        w = res.weights


def test_dynamic_federation_ends_with_a_plain_pruned_model_that_exports(
        coordinator: TestClient, make_agent: Callable[[int], EdgeAgent], h: Any) -> None:
    import onnxruntime as ort

    agents = [make_agent(0), make_agent(1)]
    fid = h.create_started(coordinator, model="fedavg_cnn", rounds=2,
                           strategy={"name": "dynamic", "params": {"export_macs": 0.5}},
                           training={"batch_size": 32, "lr": 0.05, "max_steps": 2, "upload_density": 0.1,
                                     "upload_values": "fp16"},
                           download_density=0.1, download_values="fp16")
    rows = h.run_federation(coordinator, fid, agents, max_tasks=2)
    assert [r["exported"] for r in rows] == [0, 1]
    assert rows[0]["bytes_down"] == 0  # agents rebuilt the gated initial model (sha256 checked)
    dense = rows[0]["dense_macs"]
    assert rows[0]["macs"] > dense  # round 1: the gated model (computed densely, plus its gates)
    assert 0.5 < rows[0]["density"] < 0.8 and rows[0]["effective_macs"] < 1.0
    assert rows[1]["macs"] <= 0.5 * dense  # round 2: the static export
    weights = decode(coordinator.get(f"/v1/federations/{fid}/models/2", headers=ADMIN).content).to_dense()
    assert set(weights) == _float_keys(build_model("fedavg_cnn"))  # plain zoo keys, no gates
    report = coordinator.get(f"/v1/federations/{fid}/export/report", headers=ADMIN).json()
    assert report["pruned_macs"] <= 0.5 * report["dense_macs"] and report["parity_max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(coordinator.get(f"/v1/federations/{fid}/export/model.onnx", headers=ADMIN).content)
    out = session.run(None, {session.get_inputs()[0].name: np.zeros((2, 1, 28, 28), np.float32)})[0]
    assert out.shape == (2, 10)
