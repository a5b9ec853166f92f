"""KeptSGD (FedTiny's memory-saving local optimizer) against the oracle it replaces:
torch.optim.SGD with dense momentum and the mask re-applied after every step."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import numpy as np
import pytest
import torch

from edge_agent.budget import plan_training
from models import build_model, make_synthetic
from models.training import train_epochs
from pruning.masks import apply_masks
from strategies.fedtiny.ops import fedtiny_weight_names
from strategies.fedtiny.sparse_sgd import KeptSGD, kept_sgd_grad_bytes, kept_sgd_state_bytes


def _masked_model(density: float = 0.2) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model("lenet5")
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=gen) < density
             for n, p in model.named_parameters() if n in fedtiny_weight_names(model)}
    apply_masks(model, masks)
    return model, masks


@pytest.mark.parametrize("momentum, wd, in_backward", [
    (0.9, 0.0, False),  # kills: momentum buffer dropped, or first step not buf = g
    (0.9, 5e-4, False),  # kills: weight decay missing or applied to pruned coordinates
    (0.0, 0.0, False),  # kills: a momentum-less path that still accumulates
    (0.9, 5e-4, True),  # kills: the backward gather losing or misplacing gradient values
])
def test_kept_sgd_equals_dense_sgd_with_remasking(momentum: float, wd: float, in_backward: bool) -> None:
    model, masks = _masked_model()
    oracle = copy.deepcopy(model)
    named = dict(model.named_parameters())
    ours = KeptSGD(model.parameters(), masks={id(named[n]): m for n, m in masks.items()}, lr=0.05,
                   momentum=momentum, weight_decay=wd)
    dense = torch.optim.SGD(oracle.parameters(), lr=0.05, momentum=momentum, weight_decay=wd)
    data = make_synthetic(96, seed=2)
    with ours.consume_in_backward() if in_backward else contextlib.nullcontext():
        train_epochs(model, data, optimizer=ours, epochs=2, batch_size=32, seed=3)
    train_epochs(oracle, data, optimizer=dense, epochs=2, batch_size=32, seed=3,
                 after_step=lambda: apply_masks(oracle, masks))
    for (n, p), q in zip(model.named_parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
        if n in masks:
            assert (p[~masks[n]] == 0).all()  # pruned stay exactly 0 with no re-masking


def test_kept_sgd_holds_state_only_at_kept_coordinates_and_consumes_gradients() -> None:
    # kills: a dense momentum buffer for masked weights, or gradients kept after the step
    model, masks = _masked_model(0.1)
    named = dict(model.named_parameters())
    opt = KeptSGD(model.parameters(), masks={id(named[n]): m for n, m in masks.items()}, lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(p.grad is None for p in model.parameters())
    held = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values())
    assert held == kept_sgd_state_bytes(named, masks, momentum=True)
    dense = sum(p.numel() * 4 for p in model.parameters())
    assert held < 0.35 * dense
    for n, m in masks.items():
        assert opt.state[named[n]]["momentum"].numel() == int(m.sum())


def test_in_backward_masked_gradients_are_cut_to_kept_values_before_the_step() -> None:
    # kills: the gather hook not freeing the dense gradient, or running before earlier hooks
    model, masks = _masked_model(0.1)
    named = dict(model.named_parameters())
    opt = KeptSGD(model.parameters(), masks={id(named[n]): m for n, m in masks.items()}, lr=0.05, momentum=0.9)
    seen: dict[str, int] = {}
    for n in masks:  # an earlier hook (as PrunedGradientTopK's) sees the whole gradient
        named[n].register_post_accumulate_grad_hook(lambda p, n=n: seen.__setitem__(n, p.grad.numel()))
    with opt.consume_in_backward():
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        assert all(named[n].grad is None for n in masks)  # freed during backward
        assert all(opt.state[named[n]]["grad"].numel() == int(m.sum()) for n, m in masks.items())
        assert seen == {n: named[n].numel() for n in masks}
        opt.step()
    assert all("grad" not in opt.state[named[n]] for n in masks)


def test_the_plan_counts_kept_state_instead_of_dense_momentum(h: Any) -> None:
    # kills: run_task's plan ignoring the hooks' optimizer memory (an estimate as if dense)
    model, masks = _masked_model(0.1)
    named = dict(model.named_parameters())

    def memory(frozen: tuple[str, ...]) -> tuple[int, int]:
        trains = {n: p for n, p in named.items() if n not in frozen}
        return kept_sgd_grad_bytes(trains, masks), kept_sgd_state_bytes(trains, masks, momentum=True)

    dense = plan_training(model, (1, 28, 28), 2**30, preferred_batch=32)
    kept = plan_training(model, (1, 28, 28), 2**30, preferred_batch=32, optimizer_memory=memory)
    assert dense.estimate.optimizer_bytes == dense.estimate.grads_bytes == sum(p.numel() * 4 for p in named.values())
    assert (kept.estimate.grads_bytes, kept.estimate.optimizer_bytes) == memory(())
    assert kept.estimate.total < dense.estimate.total - 0.5 * dense.estimate.optimizer_bytes


def test_agent_train_phase_trains_with_the_kept_optimizer_and_plans_for_it(h: Any) -> None:
    w = h.weights_of("lenet5")
    names = fedtiny_weight_names(build_model("lenet5"))
    rng = np.random.default_rng(0)
    w1 = {k: (v * (rng.random(v.shape) < 0.1)).astype(np.float32) if k in names else v for k, v in w.items()}
    model = build_model("lenet5")
    hooks = h.task_hooks(h.task_for("fedtiny", {"phase": "train"}), model, w1, make_synthetic(32))
    assert hooks.optimizer is not None and hooks.after_step is None  # no re-masking pass per step
    assert isinstance(hooks.optimizer(list(model.parameters()), 0.1, 0.9, 0.0), KeptSGD)
    assert hooks.optimizer_memory is not None
    grads, state = hooks.optimizer_memory((), True)
    first = names[0]
    assert hooks.optimizer_memory((first,), True)[1] == state - int(np.count_nonzero(w1[first])) * 8  # frozen: none
    assert hooks.optimizer_memory((), False)[1] == sum(int(np.count_nonzero(w1[n])) * 4 for n in names)
    assert grads < sum(v.size for v in w1.values()) * 4


@pytest.mark.parametrize("in_backward", [False, True])
def test_kept_sgd_clips_the_gradient_it_steps_on(in_backward: bool) -> None:
    # Oracle: dense SGD whose gradients are masked as they arrive, clipped to the same norm
    # (then the clip sees exactly the trained coordinates). Kills: clipping over
    # model.parameters() (inside consume_in_backward their .grad is None: no clip at all),
    # and counting the pruned coordinates' gradient in the norm.
    model, masks = _masked_model()
    oracle = copy.deepcopy(model)
    for n, q in oracle.named_parameters():
        if n in masks:
            q.register_hook(lambda g, m=masks[n]: g * m)
    named = dict(model.named_parameters())
    ours = KeptSGD(model.parameters(), masks={id(named[n]): m for n, m in masks.items()}, lr=0.05, momentum=0.9)
    dense = torch.optim.SGD(oracle.parameters(), lr=0.05, momentum=0.9)
    data = make_synthetic(96, seed=2)
    before = [p.detach().clone() for p in model.parameters()]
    with ours.consume_in_backward() if in_backward else contextlib.nullcontext():
        train_epochs(model, data, optimizer=ours, epochs=1, batch_size=32, seed=3, clip_grad_norm=0.05)
    train_epochs(oracle, data, optimizer=dense, epochs=1, batch_size=32, seed=3, clip_grad_norm=0.05)
    for (n, p), q in zip(model.named_parameters(), oracle.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    steps = [(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]
    assert float(torch.linalg.vector_norm(torch.cat(steps))) <= 3 * 0.05 * 0.05 * (1 + 0.9 + 0.81)  # 3 clipped steps
