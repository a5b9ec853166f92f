"""The metrics of a closed round, from what the round saw. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from coordinator.store import UpdateRow
from models.state import is_bn_stat
from strategies.base import Weights

__all__ = ["federated_evaluation", "round_metrics", "weight_density"]


def weight_density(weights: Weights) -> float:
    """Nonzero fraction of the conv and linear weights (tensors with ≥ 2 dimensions)."""
    mats = [v for v in weights.values() if v.ndim >= 2]
    return sum(int(np.count_nonzero(v)) for v in mats) / max(sum(v.size for v in mats), 1)


def federated_evaluation(reports: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The sample-weighted mean of the agents' evaluations of the global model they
    received (Flower's `weighted_average` over evaluate results); None when none evaluated.
    Reports are bounded by the protocol (`UpdateReport`): no NaN, no negative counts."""
    evals = [r for r in reports if r.get("eval_samples", 0) > 0 and r.get("eval_accuracy") is not None]
    if not evals:
        return None
    n = np.array([float(r["eval_samples"]) for r in evals])
    return {
        "accuracy": float(np.average([float(r["eval_accuracy"]) for r in evals], weights=n)),
        "loss": float(np.average([float(r["eval_loss"]) for r in evals], weights=n)),
        "samples": int(n.sum()), "agents": len(evals),
    }


def round_metrics(*, rnd: int, attempt: int, selected: int, updates: Sequence[UpdateRow], weights: Weights,
                  accuracy: float | None, loss: float | None, macs: int, bytes_down: int, seconds: float,
                  budget_mb: float | None, clipped: int, rule: str,
                  strategy_metrics: dict[str, Any],
                  declined: dict[str, int | None] | None = None,
                  evaluation: str = "server") -> dict[str, Any]:
    """`accuracy`/`loss`: the server's test split; with `evaluation` "federated" they are the
    agents' sample-weighted mean (of the model version the round started from), and with
    "both" that mean is also under `federated`."""
    declined = declined or {}
    reports = [u.report for u in updates]
    federated = federated_evaluation(reports) if evaluation != "server" else None
    if evaluation == "federated":
        accuracy = federated["accuracy"] if federated else None
        loss = federated["loss"] if federated else None
    # Reports are bounded by the protocol; float() keeps a huge int from overflowing numpy.
    losses = [float(r["train_loss"]) for r in reports]
    samples = [float(u.num_samples) for u in updates]
    return {
        "round": rnd, "accuracy": accuracy, "loss": loss, "evaluation": evaluation,
        **({"federated": federated} if federated is not None else {}),
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
                    "memory_limit_bytes": u.report.get("memory_limit_bytes"), "num_samples": u.num_samples,
                    **({"eval_samples": u.report["eval_samples"], "eval_accuracy": u.report.get("eval_accuracy"),
                        "eval_loss": u.report.get("eval_loss")} if u.report.get("eval_samples") else {})}
                   for u in updates],
        **strategy_metrics,
    }
