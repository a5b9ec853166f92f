"""The metrics of a closed round, from what the round saw. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from coordinator.store import UpdateRow
from models.state import is_bn_stat
from strategies.base import Weights

__all__ = ["round_metrics", "weight_density"]


def weight_density(weights: Weights) -> float:
    """Nonzero fraction of the conv and linear weights (tensors with ≥ 2 dimensions)."""
    mats = [v for v in weights.values() if v.ndim >= 2]
    return sum(int(np.count_nonzero(v)) for v in mats) / max(sum(v.size for v in mats), 1)


def round_metrics(*, rnd: int, attempt: int, selected: int, updates: Sequence[UpdateRow], weights: Weights,
                  accuracy: float, loss: float, macs: int, bytes_down: int, seconds: float,
                  budget_mb: float | None, clipped: int, rule: str,
                  strategy_metrics: dict[str, Any],
                  declined: dict[str, int | None] | None = None) -> dict[str, Any]:
    declined = declined or {}
    reports = [u.report for u in updates]
    # Reports are bounded by the protocol; float() keeps a huge int from overflowing numpy.
    losses = [float(r["train_loss"]) for r in reports]
    samples = [float(u.num_samples) for u in updates]
    return {
        "round": rnd, "accuracy": accuracy, "loss": loss,
        "participants": len(updates), "stragglers": selected - len(updates) - len(declined),
        "declined": [{"agent": a, "needed_bytes": n} for a, n in declined.items()],
        "bytes_up": sum(u.bytes for u in updates), "bytes_down": bytes_down,
        "seconds": round(seconds, 3), "attempts": attempt,
        "params": int(sum(v.size for k, v in weights.items() if not is_bn_stat(k))),
        "density": weight_density(weights),  # strategies with masks report their own
        "macs": macs,
        "train_loss": float(np.average(losses, weights=samples)) if updates else None,
        "agent_peak_mb": max((float(r.get("peak_memory_bytes", 0)) for r in reports), default=0.0) / 2**20,
        "agent_planned_mb": max((float(r.get("planned_memory_bytes", 0)) for r in reports), default=0.0) / 2**20,
        "agent_budget_mb": budget_mb,
        "clipped_updates": clipped, "aggregation": rule,
        # per agent: what it said it could hold, what it planned, what it measured
        "agents": [{"agent": u.agent_id, "budget_bytes": u.report.get("budget_bytes"),
                    "planned_bytes": u.report.get("planned_memory_bytes"),
                    "peak_bytes": u.report.get("peak_memory_bytes"), "batch_size": u.report.get("batch_size"),
                    "level": u.report.get("level"), "peak_rss_bytes": u.report.get("peak_rss_bytes"),
                    "memory_limit_bytes": u.report.get("memory_limit_bytes"), "num_samples": u.num_samples}
                   for u in updates],
        **strategy_metrics,
    }
