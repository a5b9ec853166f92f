"""FedAvg(M)'s one home, `apply_mean_delta`: the momentum recurrence, purity, restarts."""

from __future__ import annotations

import numpy as np

from strategies.fedavg import apply_mean_delta


def test_server_momentum_matches_recurrence() -> None:
    w = {"w": np.zeros(3, np.float32), "frozen": np.ones(2, np.float32)}
    d1, d2 = {"w": np.ones(3, np.float32)}, {"w": np.full(3, 2.0, np.float32)}
    w1, s1 = apply_mean_delta(w, d1, {}, server_lr=2.0, momentum=0.5)
    np.testing.assert_allclose(w1["w"], 2.0)  # v = 1
    w2, s2 = apply_mean_delta(w1, d2, s1, server_lr=2.0, momentum=0.5)
    np.testing.assert_allclose(w2["w"], 2.0 + 2.0 * (0.5 * 1 + 2))  # v = 0.5·1 + 2
    assert w2["frozen"] is w["frozen"]  # no delta: unchanged
    # a restart from the stored state continues the same recurrence
    again, _ = apply_mean_delta(w1, d2, {k: v.copy() for k, v in s1.items()}, server_lr=2.0, momentum=0.5)
    np.testing.assert_array_equal(again["w"], w2["w"])
    assert np.all(w["w"] == 0)  # pure: inputs untouched


def test_zero_momentum_is_plain_fedavg_and_keeps_no_state() -> None:
    w = {"w": np.full(2, 1.0, np.float32)}
    new, state = apply_mean_delta(w, {"w": np.full(2, 0.5, np.float32)}, {}, server_lr=1.0, momentum=0.0)
    np.testing.assert_array_equal(new["w"], [1.5, 1.5])
    assert state == {}
