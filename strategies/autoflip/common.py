"""What both halves of AutoFLIP share: the defaults of the exploration the task asks for,
which tensors the scouts score, and the names of their auxiliary uploads (the server
half sizes the uploads from these every exploration round, the agent half writes them)."""

from __future__ import annotations

from strategies.base import AUX_PREFIX, Weights

__all__ = ["EXPLORE_EPOCHS", "PATIENCE", "VAL_FRACTION", "WORK_KEYS", "scored_names", "sq_key", "work_key"]

# a scout's budget: up to 5 epochs (the paper's local epochs), stopping after one epoch
# without a better validation loss, on 10% of the local samples held out
EXPLORE_EPOCHS, PATIENCE, VAL_FRACTION = 5, 1, 0.1
# a scout's extra local work, one (1,) upload each: epochs run, optimiser steps run,
# 1 if early stopping ended it (0: it ran out of epochs or steps), its best epoch (1-based)
WORK_KEYS = ("epochs", "steps", "stopped", "best_epoch")


def scored_names(weights: Weights) -> list[str]:
    """Every parameter the scouts score: the floating-point tensors of the state that are
    not BN running statistics (those are estimates, not trained). The mask later prunes
    only the masked weights among them (`strategies.masking.masked_names`)."""
    from models.state import is_bn_stat

    return [n for n, v in weights.items() if v.dtype.kind == "f" and not is_bn_stat(n)]


def sq_key(name: str) -> str:
    """The upload of one tensor's squared displacement (θ_k − θ₀)², same shape."""
    return f"{AUX_PREFIX}sq/{name}"


def work_key(key: str) -> str:
    return f"{AUX_PREFIX}explore/{key}"
