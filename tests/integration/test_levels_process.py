"""Real agent processes under memory budgets on a federation with width levels: the level
each trains is the widest whose *measured* training peak fits its budget, and a process
memory limit (peak RSS) holds. Mutations this kills: assigning a level by width alone,
an estimate that undercounts a level (the budgeted agent's peak would exceed 1.10 x its
budget), a memory limit not turned into the working-set budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.levels import plan_levels
from coordinator.protocol import FederationCreate
from models.state import seeded_weights
from tests.helpers import Cluster

CONFIG = {"model": "fedavg_cnn", "rounds": 1, "clients_per_round": 3, "min_clients": 3, "round_deadline_s": 300,
          "data": {"dataset": "synthetic", "eval_samples": 200},
          "training": {"batch_size": 64, "lr": 0.05, "max_steps": 6},
          "levels": {"widths": [1.0, 0.5, 0.25]}}


@pytest.mark.isolated
def test_each_agent_trains_the_widest_level_whose_measured_peak_fits(tmp_path: Path) -> None:
    needs = [p.need_bytes for p in plan_levels(FederationCreate.model_validate(CONFIG),
                                               seeded_weights("fedavg_cnn", 0, in_channels=1, num_classes=10), 1)]
    between = (needs[0] + needs[1]) // 2  # fits level 1 (width 0.5), not level 0
    cluster = Cluster(tmp_path)
    try:
        cluster.start_coordinator()
        cluster.start_agent(0, 3, extra=["--memory-budget", str(needs[0])])  # level 0 at the smallest batch
        cluster.start_agent(1, 3, extra=["--memory-budget", str(between)])
        cluster.start_agent(2, 3, extra=["--memory-limit", "2GB"])  # a process limit, not a working-set budget
        cluster.wait(lambda: len(cluster.http.get("/v1/agents").json()) == 3, "3 agents enrolled")
        fid = cluster.http.post("/v1/federations", json=CONFIG).json()["id"]
        cluster.http.post(f"/v1/federations/{fid}/start").raise_for_status()
        rows = cluster.wait(lambda: cluster.http.get(f"/v1/federations/{fid}/rounds").json() or None, "round 1")
    finally:
        cluster.stop()
    by_budget = {a["budget_bytes"]: a for a in rows[0]["agents"]}
    wide, narrow = by_budget[needs[0]], by_budget[between]
    assert (wide["level"], narrow["level"]) == (0, 1)
    assert narrow["peak_bytes"] <= 1.10 * between  # the narrower level fits, as measured
    assert wide["peak_bytes"] > between  # the wider one, measured at its smallest batch, does not
    limited = next(a for a in rows[0]["agents"] if a["memory_limit_bytes"])
    assert limited["memory_limit_bytes"] == 2 << 30 and limited["level"] == 0
    assert 0 < limited["peak_rss_bytes"] <= limited["memory_limit_bytes"]
    assert limited["budget_bytes"] < limited["memory_limit_bytes"] - 100 * 2**20  # the idle process is not budget
