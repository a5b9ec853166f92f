"""Structured pruning in the protocol: the server prunes channels, and agents follow
by slicing what they hold (reshape) plus a sparse patch, bit-exact with the server."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from edge_agent.agent import EdgeAgent
from models import build_model, count_macs
from models.state import build_from_state, to_numpy_state
from sparse_kernels import decode
from sparse_kernels.reshape import apply_reshape, decode_reshape, encode_reshape
from strategies.base import RoundContext
from strategies.structured import StructuredPruning, step_targets
from tests.helpers import ADMIN


@pytest.mark.parametrize("name", ["fedavg_cnn", "lenet5", "resnet20", "vgg11_bn"])
def test_reshape_reproduces_the_pruned_weights(name: str) -> None:
    torch.manual_seed(0)
    weights = to_numpy_state(build_model(name))
    ctx = RoundContext(1, 5, name, 1, 10, None, 2)
    result = StructuredPruning(target_macs=0.4, prune_steps=1).aggregate(
        ctx, weights, {k: np.zeros_like(v) for k, v in weights.items()}, {})
    assert result.structure_changed and result.reshape
    shapes = {k: v.shape for k, v in weights.items()}
    sliced = apply_reshape(weights, decode_reshape(encode_reshape(result.reshape), shapes))
    for k, v in result.weights.items():
        np.testing.assert_array_equal(sliced[k], v)
    pruned = build_from_state(name, result.weights, in_channels=1, num_classes=10)
    # strictly fewer MACs; widths stop at the SIMD block, so small nets may stay above 0.4
    assert count_macs(pruned, (1, 28, 28)) < count_macs(build_model(name), (1, 28, 28))


def test_pruning_schedule_is_geometric_and_only_on_schedule() -> None:
    s = StructuredPruning(target_macs=0.25, start_round=2, prune_steps=2, every=2)
    assert [s.prune_step(r) for r in range(1, 8)] == [None, 0, None, 1, None, None, None]
    assert step_targets(0.25, 2) == pytest.approx([0.5, 0.25])


@pytest.mark.parametrize(
    "doc",
    [
        b"not json",
        b'{"fedslim_reshape": 1, "tensors": {"nope.weight": [null]}}',  # unknown tensor
        b'{"fedslim_reshape": 1, "tensors": {"w": [[0, 9]]}}',  # index out of range
        b'{"fedslim_reshape": 1, "tensors": {"w": [[2, 1]]}}',  # not increasing
        b'{"fedslim_reshape": 1, "tensors": {"w": [[0], null]}}',  # wrong rank
        b'{"fedslim_reshape": 2, "tensors": {}}',  # unknown version
    ],
)
def test_bad_reshape_documents_are_refused(doc: bytes) -> None:
    from sparse_kernels import CodecError

    with pytest.raises(CodecError):
        decode_reshape(doc, {"w": (4,)})


def test_agents_follow_structured_pruning_without_full_downloads(
    coordinator: TestClient, make_agent: Callable[[int], EdgeAgent], start_federation: Callable[..., str],
    run_federation: Callable[..., list],
) -> None:
    agents = [make_agent(0), make_agent(1)]
    fid = start_federation(rounds=3, model="fedavg_cnn", download_density=0.2, download_values="fp16",
                           strategy={"name": "structured", "params": {"target_macs": 0.3, "prune_steps": 2}},
                           training={"upload_density": 0.1, "upload_values": "fp16", "batch_size": 32})
    rows = run_federation(fid, agents, max_tasks=3, poll_s=2)
    assert rows[0]["macs"] < rows[0]["dense_macs"] and rows[1]["macs"] <= 0.3 * rows[0]["dense_macs"]
    full = len(coordinator.get(f"/v1/federations/{fid}/models/3", headers=ADMIN).content)
    assert all(r["bytes_down"] < full for r in rows), ([r["bytes_down"] for r in rows], full)  # never a whole model each
    server = decode(coordinator.get(f"/v1/federations/{fid}/models/3", headers=ADMIN).content).to_dense()
    mine = agents[0].sync_model(fid, 3)
    for k, v in server.items():
        np.testing.assert_array_equal(mine[k], v)
