"""Named strategy presets for the demo and benchmarks: the strategy plus the
compression settings that go with it."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["STRATEGY_PRESETS", "strategy_preset"]

# what `structured` and `lean` share: two pruning steps to a quarter of the dense MACs with
# server momentum, and top-10% int8 uploads ranked over the whole model
_QUARTER_MACS = {"target_macs": 0.25, "prune_steps": 2, "server_momentum": 0.6}
_GLOBAL_INT8_UPLOADS = {"upload_density": 0.1, "upload_values": "int8", "upload_scope": "global"}

STRATEGY_PRESETS: dict[str, dict[str, Any]] = {
    # dense FedAvg: the Flower-comparable baseline (fp32, every coordinate both ways)
    "fedavg": {"name": "fedavg"},
    # sparse FedAvg: top-10% fp16 uploads with error feedback, sparse fp16 broadcasts
    "sparse": {"name": "fedavg", "training": {"upload_density": 0.1, "upload_values": "fp16"},
               "download_density": 0.1, "download_values": "fp16"},
    # the default: structured progressive pruning to 25% of the dense MACs over rounds
    # 2–3, widths rounded to 2 (14/30/252 channels for fedavg_cnn: 23.3% of the MACs; to 8,
    # 16/24/248 and 21.7%), plus sparse exchanges: top-10% int8 uploads ranked over the
    # whole model, top-20% fp16 broadcasts and server momentum 0.6 (FedAvgM). On the
    # yardstick (3 seeds, docs/BENCHMARKS.md, issue 13): the exchange options added 0.5–0.6
    # points each over per-tensor uploads / 10% broadcasts / no momentum; int8 upload values
    # (error feedback carries the rounding) −0.06 (noise) for 18% fewer bytes; pruning a
    # round later and to width multiples of 2 +0.34, for 1.99 MB a round instead of 1.25
    "structured": {"name": "structured",
                   "params": {**_QUARTER_MACS, "start_round": 2, "round_to": 2},
                   "training": _GLOBAL_INT8_UPLOADS, "download_density": 0.2, "download_values": "fp16"},
    # for the thinnest links: pruned from round 1 to width multiples of 8 (21.7% of the
    # MACs), int8 both ways: 0.91 MB per yardstick round (69× fewer than dense FedAvg's
    # 62.9) for −0.45 points against the default (3 seeds)
    "lean": {"name": "structured",
             "params": {**_QUARTER_MACS, "start_round": 1},
             "training": _GLOBAL_INT8_UPLOADS, "download_density": 0.2, "download_values": "int8"},
    # FedDIP: cubic sparsity 50% → 90% with global magnitude reconfiguration, error
    # feedback and incremental regularisation; top-10% int8 uploads of the dense delta,
    # ranked over the whole model, and server momentum 0.6 (FedAvgM over the dense weights:
    # not in the paper, one of the aids that let the compressed exchange keep the exact
    # one's accuracy). The mask travels as its own artifact (sparse_kernels.masks), so
    # broadcasts need not be exact: the zeros agents hold are the mask's whatever the
    # patch. Top-10% int8 of each tensor (the whole support at the end density; the rest
    # waits in the server's residual). Yardstick, 3 seeds, against the paper's method with
    # every exchange exact (dense fp32 both ways, no momentum, 41 MB/round): −0.11 ± 0.11
    # points at 2.95 MB/round (momentum with the exact exchange: +0.30); without momentum
    # −0.46 ± 0.18 at 2.88 (python -m bench.variants --group feddip-momentum,
    # docs/BENCHMARKS.md).
    "feddip": {"name": "feddip", "params": {"s0": 0.5, "sT": 0.9, "lam_max": 1e-3, "server_momentum": 0.6},
               "training": {**_GLOBAL_INT8_UPLOADS},
               "download_density": 0.1, "download_values": "int8"},
    # FedTiny: a candidate pool of 5 masks at 10% density, selection by averaged loss
    # (adaptive BN for models with BN), then prune-and-grow of one layer per round, last
    # first; only kept coordinates travel up (fp16), sparse top-3% fp16 broadcasts as for
    # FedDIP (the mask is an artifact of its own, its per-round change a mask patch; the
    # selection round's model patch carries just the BN statistics).
    "fedtiny": {"name": "fedtiny", "params": {"density": 0.1, "pool_size": 5},
                "training": {"upload_density": 0.1, "upload_values": "fp16"},
                "download_density": 0.03, "download_values": "fp16"},
    # AutoFLIP: one exploration round before training (every sampled client a scout: up to
    # 5 epochs from θ₀, early stopping on 10% held out, its squared displacement uploaded as
    # fp32 statistics), then the 30% of weights that moved least are pruned; the pruned
    # model's kept coordinates go up dense in fp16, sparse fp16 broadcasts (the mask is an
    # artifact of its own, as for FedDIP).
    "autoflip": {"name": "autoflip", "params": {"explore_rounds": 1, "q": 0.3, "scope": "global"},
                 "training": {"upload_density": 1.0, "upload_values": "fp16"},
                 "download_density": 0.1, "download_values": "fp16"},
    # adaptive dynamic pruning: per-sample channel gates (ratio 0.7, every conv but the
    # first) during training; closing the last round the gated network is folded into a
    # static one channel-pruned to 50% of the dense MACs. Channels no sample of a batch
    # keeps get no gradient (fedavg_cnn at init, batch 32, 10 steps: 15 of 64 filters and
    # 29 % of all coordinates unchanged, which dense fp32 uploads already leave out), but
    # top-10 % fp16 exchanges as "structured" does send far less.
    "dynamic": {"name": "dynamic", "params": {"ratio": 0.7, "export_macs": 0.5},
                "training": {"upload_density": 0.1, "upload_values": "fp16"},
                "download_density": 0.1, "download_values": "fp16"},
}


def strategy_preset(name: str, *, rounds: int) -> dict[str, Any]:
    if name not in STRATEGY_PRESETS:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(sorted(STRATEGY_PRESETS))}")
    return copy.deepcopy(STRATEGY_PRESETS[name])  # presets share nested dicts: never hand one out
