"""Named strategy presets for the demo and benchmarks: the strategy plus the
compression settings that go with it."""

from __future__ import annotations

from typing import Any

__all__ = ["STRATEGY_PRESETS", "strategy_preset"]

STRATEGY_PRESETS: dict[str, dict[str, Any]] = {
    # dense FedAvg: the Flower-comparable baseline (fp32, every coordinate both ways)
    "fedavg": {"name": "fedavg"},
    # sparse FedAvg: top-10% fp16 uploads with error feedback, sparse fp16 broadcasts
    "sparse": {"name": "fedavg", "training": {"upload_density": 0.1, "upload_values": "fp16"},
               "download_density": 0.1, "download_values": "fp16"},
    # the default: structured progressive pruning to 25% of the dense MACs over rounds
    # 1–3, plus the sparse uploads/broadcasts above
    "structured": {"name": "structured", "params": {"target_macs": 0.25, "start_round": 1, "prune_steps": 3},
                   "training": {"upload_density": 0.1, "upload_values": "fp16"},
                   "download_density": 0.1, "download_values": "fp16"},
}


def strategy_preset(name: str, *, rounds: int) -> dict[str, Any]:
    if name not in STRATEGY_PRESETS:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(sorted(STRATEGY_PRESETS))}")
    return dict(STRATEGY_PRESETS[name])
