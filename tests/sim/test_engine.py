"""The simulation engine against oracles: one round equals FedAvg computed by hand from
the same shards, seeds and loop; a seed fixes the whole run; backends agree; and the
engine's construction cost per virtual client is a few hundred bytes (no model, no data
copy per client).

Mutations these kill: client i trained on another shard or with another seed (oracle,
determinism), sampled ids mapped to clients in enrollment order (determinism: ids are
random), residuals dropped or mixed between clients (determinism on the sparse preset
against a fixed reference of two runs), a model or shard materialised per client at
construction (memory), the Ray workers training something else (backend equality)."""

from __future__ import annotations

import importlib.util
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models import make_synthetic, partition, train_epochs
from models.state import build_from_state, seeded_weights, to_numpy_state
from sim.engine import SimEngine
from sim.virtual import agent_seed
from sparse_kernels import MAX_MODEL_BYTES, decode


def tiny_federation(**overrides: Any) -> dict[str, Any]:
    """LeNet-5 on the synthetic set (2,000 train images), a few local steps."""
    config: dict[str, Any] = {
        "model": "lenet5", "rounds": 1, "clients_per_round": 3, "min_clients": 3, "round_deadline_s": 600,
        "seed": 3, "data": {"dataset": "synthetic", "partition": "dirichlet:0.5", "eval_samples": 200},
        "training": {"batch_size": 16, "lr": 0.05, "momentum": 0.9, "max_steps": 3},
    }
    config.update(overrides)
    return config


def run_engine(tmp: Path, config: dict[str, Any], clients: int, **kw: Any) -> tuple[dict[str, np.ndarray], list[dict]]:
    engine = SimEngine(config, clients=clients, workdir=tmp, **kw)
    try:
        rows = engine.run()
        final = decode(engine.final_model(), max_bytes=MAX_MODEL_BYTES).to_dense()
    finally:
        engine.close()
    return final, rows


def test_one_round_equals_fedavg_computed_by_hand(tmp_path: Path, one_thread: None) -> None:
    # Arrange: 3 clients, all sampled, dense fp32 FedAvg: the new model is w0 + the
    # sample-weighted mean of the clients' deltas
    config = tiny_federation()
    data = make_synthetic(2000, seed=3)
    parts = partition(data.labels, 3, "dirichlet:0.5", seed=3)
    w0 = seeded_weights("lenet5", 3, in_channels=1, num_classes=10)

    # Act
    final, rows = run_engine(tmp_path, config, clients=3)

    # Assert: the same model as training each shard by hand with the agent's seed
    deltas, counts = [], []
    for i, idx in enumerate(parts):
        model = build_from_state("lenet5", w0, in_channels=1, num_classes=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        stats = train_epochs(model, data.subset(idx), optimizer=opt, batch_size=16, max_steps=3,
                             seed=agent_seed(3, i) * 100_003 + 1)
        local = to_numpy_state(model)
        deltas.append({k: local[k] - w0[k] for k in w0})
        counts.append(stats.samples)
    share = np.array(counts, dtype=np.float64) / sum(counts)
    for k in w0:
        expected = w0[k] + sum(s * d[k] for s, d in zip(share, deltas, strict=True))
        np.testing.assert_allclose(final[k], expected, rtol=1e-5, atol=1e-6, err_msg=k)
    assert len(rows) == 1 and rows[0]["participants"] == 3 and rows[0]["bytes_up"] > 0


def test_a_seed_fixes_the_run_and_another_seed_changes_it(tmp_path: Path, one_thread: None) -> None:
    # Arrange: the sparse preset (top-10 % fp16 uploads with error feedback, sparse
    # broadcasts), 6 clients, 2 sampled per round, 3 rounds: residuals carry between rounds
    config = tiny_federation(rounds=3, clients_per_round=2, min_clients=2,
                             training={"batch_size": 16, "lr": 0.05, "max_steps": 3, "upload_density": 0.1,
                                       "upload_values": "fp16"},
                             download_density=0.1, download_values="fp16")

    # Act
    a, rows_a = run_engine(tmp_path / "a", config, clients=6)
    b, rows_b = run_engine(tmp_path / "b", config, clients=6)
    c, _ = run_engine(tmp_path / "c", {**config, "seed": 4}, clients=6)

    # Assert: bit-identical models and metrics for one seed; another seed differs
    assert all(np.array_equal(a[k], b[k]) for k in a)
    keys = ("accuracy", "loss", "train_loss", "bytes_up", "bytes_down", "participants", "density")
    assert [[r[k] for k in keys] for r in rows_a] == [[r[k] for k in keys] for r in rows_b]
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    # the downloads were counted as agents make them: none in round 1 (rebuilt from the seed)
    assert rows_a[0]["bytes_down"] == 0 and all(r["bytes_down"] > 0 for r in rows_a[1:])
    # residuals only for the clients that uploaded a compressed delta
    assert 2 <= len(list((tmp_path / "a" / "residuals").glob("client-*.npz"))) <= 6


def _construction_bytes(tmp: Path, clients: int) -> int:
    tracemalloc.start()
    config = tiny_federation(clients_per_round=1, min_clients=1)
    config["data"]["partition"] = "iid"  # 2,000 images cannot give 10k clients Dirichlet's 10 each
    engine = SimEngine(config, clients=clients, workdir=tmp)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    engine.close()
    return held


def test_construction_memory_is_flat_in_the_number_of_clients(tmp_path: Path) -> None:
    # Arrange / act: 100 and 2,100 virtual clients of the same federation (each enrollment
    # is a durable SQLite transaction: 10k take ~35 s under tracemalloc, too slow here)
    small = _construction_bytes(tmp_path / "small", 100)
    large = _construction_bytes(tmp_path / "large", 2_100)

    # Assert: the extra 2,000 clients cost under 1 KB each (identity strings, an index
    # array slice, a held-version int) — one LeNet-5 copy alone is 250 KB
    per_client = (large - small) / 2_000
    assert per_client < 1024, f"{per_client:.0f} B per virtual client ({small} B for 100, {large} B for 2,100)"


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install fedslim[sim])")
def test_ray_backend_trains_the_same_model_as_the_local_one(tmp_path: Path, one_thread: None) -> None:
    # Arrange: 4 clients, 2 sampled, 1 round
    config = tiny_federation(clients_per_round=2, min_clients=2)

    # Act
    local, _ = run_engine(tmp_path / "local", config, clients=4)
    ray, rows = run_engine(tmp_path / "ray", config, clients=4, backend="ray")

    # Assert: identical (each client is a single-threaded job either way)
    assert rows[0]["participants"] == 2
    for k in local:
        np.testing.assert_allclose(ray[k], local[k], rtol=0, atol=1e-6, err_msg=k)


def test_clients_whose_budget_fits_nothing_decline_and_the_engine_stops_with_the_reason(tmp_path: Path) -> None:
    # Arrange: a 64 KiB training budget: no batch size of LeNet-5 fits, every client declines
    config = tiny_federation(clients_per_round=2, min_clients=2)

    # Act / assert: the service stops sampling them; the engine says why instead of spinning
    engine = SimEngine(config, clients=2, workdir=tmp_path, memory_budget_bytes=64 << 10, stall_s=2.0)
    try:
        with pytest.raises(RuntimeError, match="made no progress"):
            engine.run()
        needs = engine.service.agent_needs()
    finally:
        engine.close()
    assert len(needs) == 2 and all(n > 64 << 10 for per in needs.values() for n in per.values())


def test_width_levels_run_in_the_engine_at_the_level_the_budget_fits(tmp_path: Path) -> None:
    from coordinator.levels import plan_levels
    from coordinator.protocol import FederationCreate

    config = tiny_federation(clients_per_round=2, min_clients=2, levels={"widths": [1.0, 0.5]})
    levels = plan_levels(FederationCreate.model_validate(config),
                         seeded_weights("lenet5", 3, in_channels=1, num_classes=10), 1)
    budget = (levels[0].need_bytes + levels[1].need_bytes) // 2  # level 1 only
    _, rows = run_engine(tmp_path, config, clients=2, memory_budget_bytes=budget)
    assert [a["level"] for a in rows[0]["agents"]] == [1, 1]
    assert rows[0]["levels"][1]["agents"] and not rows[0]["levels"][0]["agents"]


def test_mask_strategy_downloads_as_the_agent_does(tmp_path: Path, one_thread: None) -> None:
    """FedDIP under lossy sparse broadcasts: the engine's clients hold exactly 0 off the
    server's mask, and each pays for the model patch plus the mask patch per round (the
    mask it holds is version-1's), nothing for version 0 (rebuilt from the seed).
    Kills: the engine not applying w⊙m after the patch (its final model differs from the
    service's off the mask), or downloading whole masks where the agent patches them."""
    from models.state import build_from_state as build
    from pruning.masks import masked_weight_names
    from sparse_kernels.masks import decode_masks

    config = tiny_federation(rounds=3, download_density=0.1, download_values="fp16",
                             strategy={"name": "feddip", "params": {"sT": 0.8, "reconfigure_every": 1}})
    engine = SimEngine(config, clients=3, workdir=tmp_path)
    try:
        rows = engine.run()
        svc, fid = engine.service, engine.fid
        assert rows[0]["bytes_down"] == 0
        for row in rows[1:]:
            v = row["round"] - 1  # the base version this round's clients downloaded into
            paid = len(svc.model_bytes(fid, v, patch=True).data) + len(svc.model_bytes(fid, v, patch=True, mask=True).data)
            assert row["bytes_down"] == 3 * paid
        assert engine._global is not None and engine._global[0] == 2
        held = engine._global[1]  # what the clients of round 3 trained from, version 2
        served = svc.model_bytes(fid, 2)
        server = decode(served.data, max_bytes=MAX_MODEL_BYTES).to_dense()
        names = masked_weight_names(build("lenet5", server, in_channels=1, num_classes=10))
        masks = decode_masks(svc.model_bytes(fid, 2, mask=True).data, shapes={k: w.shape for k, w in server.items()},
                             names=names)
        for k, w in server.items():
            np.testing.assert_array_equal(held[k], w)
        for n, m in masks.items():
            assert not held[n][~m].any()
    finally:
        engine.close()
