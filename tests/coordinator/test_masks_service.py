"""Mask artifacts through the service: a FedDIP federation with lossy sparse broadcasts
(fp16 values, top-10% patches) run by real agents in-process.

Oracle: the strategy's own reported density, and the server's masks. Mutations killed:
- the service not passing `masks` to `make_broadcast` (newly pruned weights are not all
  zeroed by a top-10% patch, so the served model has nonzeros off the mask);
- the agent downloading the whole mask although it holds version-1's (the mask patch unused);
- the agent not applying w⊙m after a patch (`EdgeAgent.sync_model`: it keeps the weights
  the reconfiguration pruned, so its model differs from the server's);
- the task naming no mask (`mask_sha256=""` in `_task_json`: agents fall back to zeros);
- the service storing no mask patch (`_put_masks` without `before`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from coordinator.protocol import MASK_HEADER, Task
from edge_agent.agent import EdgeAgent
from models.state import build_from_state
from pruning.masks import masked_weight_names
from sparse_kernels import decode
from sparse_kernels.masks import decode_masks
from tests.federation_fixtures import create_started, run_to_completion
from tests.helpers import ADMIN


def test_feddip_with_lossy_sparse_broadcasts_serves_the_strategys_masks_exactly(
        coordinator: TestClient, make_agent: Callable[[int], EdgeAgent], one_thread: None) -> None:
    # Arrange: lossy, sparse broadcasts; the mask reconfigured every round (50% -> 80% sparsity)
    agents = [make_agent(0), make_agent(1)]
    fid = create_started(coordinator, rounds=3, download_density=0.1, download_values="fp16",
                         strategy={"name": "feddip", "params": {"sT": 0.8, "reconfigure_every": 1}},
                         training={"batch_size": 32, "lr": 0.05, "max_steps": 4, "upload_density": 0.2,
                                   "upload_values": "fp16"})

    tasks: list[Task] = []  # the tasks agent 0 handled
    handle = agents[0].handle
    agents[0].handle = lambda task: (tasks.append(task), handle(task))[1]  # type: ignore[method-assign]

    # Act
    rows = run_to_completion(coordinator, fid, agents, max_tasks=3)

    # Assert
    assert [r["reconfigured"] for r in rows] == [1, 1, 1]
    assert rows[0]["bytes_down"] == 0  # version 0's model and mask rebuilt by the agents (sha256 checked)
    server: dict[str, Any] = {}
    for row in rows:
        v = row["round"]
        served = coordinator.get(f"/v1/federations/{fid}/models/{v}/mask", headers=ADMIN)
        assert served.status_code == 200 and served.headers["X-Fedslim-Kind"] == "mask"
        patch = coordinator.get(f"/v1/federations/{fid}/models/{v}/patch", headers=ADMIN)
        assert patch.headers[MASK_HEADER] == hashlib.sha256(served.content).hexdigest()
        model = decode(coordinator.get(f"/v1/federations/{fid}/models/{v}", headers=ADMIN).content).to_dense()
        names = masked_weight_names(build_from_state("lenet5", model, in_channels=1, num_classes=10))
        masks = decode_masks(served.content, shapes={k: w.shape for k, w in model.items()}, names=names)
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.size for m in masks.values())
        # the served mask's density is the strategy's, exactly (not approximately)
        assert kept == row["mask_density"] == row["density"]
        for n, m in masks.items():  # what agents hold is exactly 0 off the mask, however lossy the patch
            assert not model[n][~m].any()
        if v > 1:  # the flips from version v-1's mask, far smaller than the mask itself
            flips = coordinator.get(f"/v1/federations/{fid}/models/{v}/mask/patch", headers=ADMIN)
            assert flips.status_code == 200 and len(flips.content) < len(served.content)
            xor = decode_masks(flips.content, shapes={k: w.shape for k, w in model.items()}, names=names)
            for n in names:
                np.testing.assert_array_equal(xor[n], server["masks"][n] ^ masks[n])
        server = {"model": model, "masks": masks}

    # each task named its base version's mask artifact
    assert [t.model_version for t in tasks] == [0, 1, 2]
    for t in tasks:
        mask = coordinator.get(f"/v1/federations/{fid}/models/{t.model_version}/mask", headers=ADMIN).content
        assert t.mask_sha256 == hashlib.sha256(mask).hexdigest()

    # the agent's model (cached version 2, patched to 3 with w⊙m after the patch) is the
    # server's bit for bit, and 0 exactly where the server's mask says pruned
    before = agents[0].client.bytes_down
    held = agents[0].sync_model(fid, 3)
    # ... downloading only the model patch and the mask patch (it held version 2's mask)
    sizes = [len(coordinator.get(f"/v1/federations/{fid}/models/3/{what}", headers=ADMIN).content)
             for what in ("patch", "mask/patch")]
    assert agents[0].client.bytes_down - before == sum(sizes)
    for k, w in server["model"].items():
        np.testing.assert_array_equal(held[k], w)
    for n, m in server["masks"].items():
        assert not held[n][~m].any()


def test_mask_downloads_need_a_reader(coordinator: TestClient, one_thread: None) -> None:
    fid = create_started(coordinator, rounds=1, strategy={"name": "feddip", "params": {}})
    assert coordinator.get(f"/v1/federations/{fid}/models/0/mask").status_code == 401  # same auth as models
    assert coordinator.get(f"/v1/federations/{fid}/models/0/mask", headers=ADMIN).status_code == 200
    fedavg = create_started(coordinator, rounds=1)
    assert coordinator.get(f"/v1/federations/{fedavg}/models/0/mask", headers=ADMIN).status_code == 404
