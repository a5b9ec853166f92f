"""AutoFLIP: guidance scores and the quantile mask prune what moved least; the scout's
validation split and early stopping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import ImageDataset, build_model, make_synthetic
from strategies.autoflip.ops import guidance_masks, guidance_scores, stop_early, train_scout, validation_split


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


@pytest.mark.parametrize(("losses", "patience", "stop"), [
    ([1.0], 1, False),  # one epoch: nothing to compare with
    ([1.0, 0.9], 1, False),  # improving
    ([1.0, 1.1], 1, True),  # one epoch worse, patience 1
    ([1.0, 1.0], 1, True),  # a tie is no improvement
    ([1.0, 1.1], 2, False),  # patience 2 waits another epoch...
    ([1.0, 1.1, 1.05], 2, True),  # ...which did not beat 1.0 either
    ([1.0, 1.1, 0.9], 2, False),  # a new best resets the wait
])
def test_stop_early_after_patience_epochs_without_a_better_validation_loss(
        losses: list[float], patience: int, stop: bool) -> None:
    # Kills: patience off by one, ties counted as improvements, comparing with the last
    # epoch instead of the best.
    assert stop_early(losses, patience) is stop


def test_validation_split_is_seeded_disjoint_and_covers_the_data() -> None:
    # Kills: an unseeded split (scouts of one client disagree across retries), overlap
    # between train and validation, or a split that holds out everything.
    tr, va = validation_split(50, 0.2, seed=3)
    assert len(va) == 10 and len(tr) == 40 and not set(tr) & set(va) and set(tr) | set(va) == set(range(50))
    assert all(np.array_equal(a, b) for a, b in zip((tr, va), validation_split(50, 0.2, seed=3), strict=True))
    assert not np.array_equal(va, validation_split(50, 0.2, seed=4)[1])
    assert len(validation_split(1, 0.5, seed=0)[0]) == 1  # never all held out
    assert len(validation_split(50, 0.0, seed=0)[1]) == 0  # no validation: no early stopping


def _scout_data(contradict: bool) -> tuple[ImageDataset, ImageDataset]:
    train = make_synthetic(64, seed=0)
    val = make_synthetic(64, seed=0, split="test")
    if contradict:  # same classes, every label shifted: the better θ fits train, the worse val gets
        val = ImageDataset(val.images, (val.labels + 1) % 10, val.num_classes, val.name)
    return train, val


def test_early_stopping_stops_when_the_validation_loss_rises() -> None:
    # Kills: early stopping ignored (all 8 epochs run), stopping on the training loss
    # (which keeps falling here), or patience counted from the last epoch instead of the best.
    torch.manual_seed(0)
    model = build_model("lenet5")
    train, val = _scout_data(contradict=True)
    run = train_scout(model, train, val, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), epochs=8,
                      patience=2, batch_size=16, seed=0)
    assert run.stopped and run.epochs < 8
    assert run.epochs == run.best_epoch + 2  # exactly `patience` epochs past the best
    best = run.best_epoch - 1
    assert all(v >= run.val_losses[best] for v in run.val_losses[best:])  # none after it beat it
    assert run.steps == run.epochs * 4 and run.stats.samples == 64


def test_a_scout_that_keeps_improving_runs_every_epoch() -> None:
    # Kills: a scout that always stops after the first epochs, whatever the validation says.
    torch.manual_seed(0)
    model = build_model("lenet5")
    train, val = _scout_data(contradict=False)
    run = train_scout(model, train, val, optimizer=torch.optim.SGD(model.parameters(), lr=0.02), epochs=4,
                      patience=1, batch_size=16, seed=0)
    assert not run.stopped and run.epochs == 4 and run.best_epoch == 4
    assert list(run.val_losses) == sorted(run.val_losses, reverse=True)
