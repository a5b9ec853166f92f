"""Adaptive dynamic pruning's round metrics from the gate statistics, against hand
counts: a survivor of bench.mutants renamed ``unused_channels`` unnoticed."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.dynamic.common import stat_key
from strategies.dynamic.server import _gate_metrics


def test_gate_metrics_count_kept_and_never_used_channels() -> None:
    widths = {"a": 4, "b": 2}
    stats = {stat_key("usage", "a"): np.array([1.0, 0.5, 0.0, 0.25]), stat_key("gate", "a"): np.array([1, 1, 0, 1]),
             stat_key("usage", "b"): np.array([0.0, 1.0]), stat_key("gate", "b"): np.array([0, 1]),
             stat_key("macs", "a"): np.array([0.5]), stat_key("macs", "b"): np.array([0.25])}
    profile = {"layers": {"a": 100.0, "b": 300.0}, "dense": 1000.0, "gated": 1010.0}
    m = _gate_metrics(stats, widths, profile)
    assert m["density"] == pytest.approx(2.75 / 6)
    assert m["unused_channels"] == pytest.approx(2 / 6)  # a's third and b's first never open
    assert m["gated_conv_macs"] == pytest.approx((0.5 * 100 + 0.25 * 300) / 400)
    assert m["effective_macs"] == pytest.approx((1000 - 400 + 125 + 10) / 1000)
    assert m["gate_overhead_macs"] == pytest.approx(10 / 1000)
