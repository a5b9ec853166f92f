"""FedDIP (Long et al., ICDM 2023; ALGORITHMS.md §4): dynamic pruning with error feedback
and incremental regularisation, server half.

- Round 0 (`initial_weights`): a random ERK mask at density 1 − s0 (= 50%) over the
  masked weights (conv/linear weights; BN, biases and downsample convs dense).
- Closing round t: dense FedAvg w ← w + lr·Δ̄ (clients upload their *dense* delta, so
  pruned coordinates that learned locally under error feedback show up here), or FedAvgM
  with ``server_momentum`` β > 0 (w ← w + lr·v, v ← β·v + Δ̄; not in the paper: one of the
  issue-13 aids that let a compressed exchange keep the exact one's accuracy); at a
  reconfiguration round (t = R, 2R, …) the mask is recomputed by **global** magnitude over
  the aggregated dense weights to density 1 − s_t, s_t = s_T + (s0 − s_T)(1 − t/T)³;
  otherwise the mask is kept. With ``reapply_mask`` (the authors' code path,
  EricLoong/feddip) the previous mask is applied to the averaged weights first, so global
  magnitude only ever removes coordinates: what was pruned stays pruned (no regrowth).
  The result is w⊙m: pruned coordinates exactly 0.
- The mask lives in the strategy state (``mask/<name>``, uint8; round 0's from
  `initial_state`), which the coordinator serves to agents as the version's mask artifact:
  the aggregated dense weights are no longer zero at pruned positions, and a lossy
  broadcast would not keep zeros either.
- `task_params`: λ_t of the incremental regulariser (0 → λ_max in 20 equal steps over T
  rounds; round r trains with λ_{r−1}) and ``error_feedback``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from strategies.base import RoundContext, RoundResult, Strategy, Weights
from strategies.fedavg import apply_mean_delta
from strategies.feddip.common import S0, S_T, SEED, erk_initial_masks, erk_initial_weights
from strategies.masking import (
    apply_np_masks,
    density_of,
    masked_names,
    masks_from_state,
    masks_to_state,
)

__all__ = ["FedDIP", "auto_reconfigure_every"]

def auto_reconfigure_every(total_rounds: int) -> int:
    """R = 5 as in the paper for runs of ≥ 50 rounds; short runs reconfigure more often
    (every ⌊T/10⌋ rounds, at least every round) so that the schedule is followed."""
    return 5 if total_rounds >= 50 else max(1, total_rounds // 10)


class FedDIP(Strategy):
    name = "feddip"

    def __init__(self, *, T: int | None = None, s0: float = S0, sT: float = S_T,
                 reconfigure_every: int | None = None, lam_max: float = 1e-3, lam_steps: int = 20,
                 error_feedback: bool = True, seed: int = SEED, server_lr: float = 1.0,
                 reapply_mask: bool = False, server_momentum: float = 0.0) -> None:
        if T is not None and T < 1:
            raise ValueError("T must be >= 1")
        if not (0.0 <= s0 < 1.0 and 0.0 <= sT < 1.0):
            raise ValueError("need 0 <= s0 < 1 and 0 <= sT < 1")
        if reconfigure_every is not None and reconfigure_every < 1:
            raise ValueError("reconfigure_every must be >= 1")
        if lam_max < 0 or lam_steps < 1 or server_lr <= 0:
            raise ValueError("need lam_max >= 0, lam_steps >= 1, server_lr > 0")
        if not 0 <= server_momentum < 1:
            raise ValueError("need 0 <= server_momentum < 1")
        if not isinstance(reapply_mask, bool):
            raise ValueError("reapply_mask must be true or false")
        self.T, self.s0, self.sT = T, s0, sT
        self.reconfigure_every, self.lam_max, self.lam_steps = reconfigure_every, lam_max, lam_steps
        self.error_feedback, self.seed, self.server_lr = error_feedback, seed, server_lr
        self.reapply_mask, self.server_momentum = reapply_mask, server_momentum

    # ------------------------------------------------------------------ schedules
    def total_rounds(self, ctx_total: int) -> int:
        return self.T if self.T is not None else ctx_total

    def every(self, total_rounds: int) -> int:
        return self.reconfigure_every or auto_reconfigure_every(self.total_rounds(total_rounds))

    def target_density(self, t: int, total_rounds: int) -> float:
        """1 − s_t: the density the mask has after closing round t (t = 0: the ERK mask)."""
        from pruning.schedules import CubicSparsity

        return CubicSparsity(self.total_rounds(total_rounds), self.s0, self.sT).density(t)

    def is_reconfiguration(self, t: int, total_rounds: int) -> bool:
        from pruning.schedules import is_reconfiguration_round

        return is_reconfiguration_round(t, every=self.every(total_rounds))

    def lam(self, rnd: int, total_rounds: int) -> float:
        """λ used while training round `rnd` (1-based): λ_{rnd−1}."""
        from pruning.schedules import IncrementalLambda

        return IncrementalLambda(self.total_rounds(total_rounds), self.lam_max, self.lam_steps)(rnd - 1)

    # ------------------------------------------------------------------ strategy
    def task_params(self, rnd: int, weights: Weights, state: dict[str, np.ndarray]) -> dict[str, Any]:
        total = self.T or (int(state["total_rounds"][0]) if "total_rounds" in state else None)
        # Round 1 of a federation with no explicit T: the state is still empty, but λ_0 = 0
        # for every T, so nothing is lost.
        lam = self.lam(rnd, total) if total else 0.0
        return {"lam": float(lam), "error_feedback": self.error_feedback}

    def initial_weights(self, weights: Weights, ctx: RoundContext) -> Weights:
        return erk_initial_weights(weights, ctx, T=self.T, s0=self.s0, sT=self.sT, seed=self.seed)

    def initial_state(self, weights: Weights, ctx: RoundContext) -> dict[str, np.ndarray]:
        # version 0's mask artifact: round 1 trains under the ERK mask
        return masks_to_state(erk_initial_masks(weights, ctx, T=self.T, s0=self.s0, sT=self.sT, seed=self.seed))

    def aggregate(self, ctx: RoundContext, weights: Weights, mean_delta: Weights,
                  state: dict[str, np.ndarray]) -> RoundResult:
        names = masked_names(ctx, weights)
        masks = masks_from_state(state)
        if not masks:  # round 1 of a federation created before `initial_state`: the ERK model's zeros
            masks = {n: weights[n] != 0 for n in names}
        # the velocity is over the dense weights: a pruned coordinate keeps its own, so one
        # that regrows resumes where it was
        dense, velocity = apply_mean_delta(weights, mean_delta, state, server_lr=self.server_lr,
                                           momentum=self.server_momentum)
        t = ctx.round
        reconfigured = self.is_reconfiguration(t, ctx.total_rounds)
        changed = regrown = 0
        if reconfigured:
            import torch

            from pruning.masks import magnitude_masks

            # reapply_mask: pruned coordinates enter the ranking at |0| and lose it
            ranked = apply_np_masks(dense, masks) if self.reapply_mask else dense
            new_masks = {n: m.numpy() for n, m in magnitude_masks(
                {n: torch.from_numpy(ranked[n]) for n in names},
                self.target_density(t, ctx.total_rounds), scope="global").items()}
            changed = sum(int(np.count_nonzero(new_masks[n] != masks[n])) for n in names)
            regrown = sum(int(np.count_nonzero(new_masks[n] & ~masks[n])) for n in names)
            masks = new_masks
        new = apply_np_masks(dense, masks)
        total = self.total_rounds(ctx.total_rounds)
        metrics: dict[str, Any] = {
            "density": density_of(new, names),
            "mask_density": sum(int(m.sum()) for m in masks.values()) / max(sum(m.size for m in masks.values()), 1),
            "target_density": self.target_density(t if reconfigured else self._last_reconfig(t, ctx.total_rounds),
                                                  ctx.total_rounds),
            "reconfigured": int(reconfigured), "mask_changes": changed, "mask_regrown": regrown,
            "lam": self.lam(t, total),
        }
        new_state = {**masks_to_state(masks), **velocity,
                     "total_rounds": np.array([ctx.total_rounds], dtype=np.int64)}
        return RoundResult(new, state=new_state, metrics=metrics)

    def _last_reconfig(self, t: int, total_rounds: int) -> int:
        every = self.every(total_rounds)
        return (t // every) * every
