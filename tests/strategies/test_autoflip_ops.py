"""AutoFLIP: guidance scores and the quantile mask prune what moved least."""

from __future__ import annotations

import pytest
import torch

from strategies.autoflip.ops import guidance_masks, guidance_scores


def test_guidance_scores_are_min_max_normalised_mean_squared_moves() -> None:
    base = {"w": torch.zeros(4), "b": torch.ones(2), "steps": torch.tensor(3)}
    explored = [{"w": torch.tensor([0.0, 1.0, 2.0, 3.0]), "b": torch.ones(2), "steps": torch.tensor(5)},
                {"w": torch.tensor([0.0, -1.0, 0.0, 1.0]), "b": torch.ones(2), "steps": torch.tensor(5)}]
    g = guidance_scores(base, explored)
    assert set(g) == {"w", "b"}  # integer counters skipped
    # mean squared moves: [0, 1, 2, 5] → min–max → [0, .2, .4, 1]
    assert torch.allclose(g["w"], torch.tensor([0.0, 0.2, 0.4, 1.0]))
    assert torch.equal(g["b"], torch.zeros(2))  # nothing moved: 0, not NaN


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_guidance_masks_prune_exactly_what_moved_least(scope: str) -> None:
    torch.manual_seed(0)
    base = {"a": torch.randn(10, 10), "b": torch.randn(50)}
    # Per-parameter movement scale known in advance: a random permutation of distinct levels.
    scale = {n: torch.randperm(t.numel()).float().view_as(t) + 1 for n, t in base.items()}
    explored = [{n: base[n] + sign * scale[n] * 1e-2 for n in base} for sign in (1.0, -1.0, 2.0)]
    scores = guidance_scores(base, explored)
    masks = guidance_masks(scores, q=0.3, scope=scope)  # type: ignore[arg-type]
    total = sum(t.numel() for t in base.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    if scope == "layer":
        for n, m in masks.items():
            assert int((~m).sum()) == round(0.3 * base[n].numel())
            # pruned ⇔ among the 30% smallest movement scales of that tensor
            threshold = scale[n].flatten().kthvalue(round(0.3 * base[n].numel())).values
            assert torch.equal(~m, scale[n] <= threshold)
    else:
        assert pruned == round(0.3 * total)
        flat_scores = torch.cat([scores[n].flatten() for n in base])
        flat_pruned = torch.cat([(~masks[n]).flatten() for n in base])
        assert flat_scores[flat_pruned].max() <= flat_scores[~flat_pruned].min()
