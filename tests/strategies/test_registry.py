"""The explicit strategy registry: every method has both halves, or says it trains plain."""

from __future__ import annotations

import inspect

import pytest

from strategies import (
    REGISTRY,
    STRATEGIES,
    TRAINS_PLAIN,
    AgentHalf,
    LocalHooks,
    agent_half,
    build_strategy,
)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_strategy_has_an_agent_half_or_says_it_trains_plain(name: str) -> None:
    entry = REGISTRY[name]
    assert entry.server.name == name  # the registry key is the server half's name
    if entry.agent == TRAINS_PLAIN:
        assert agent_half(name) is None
        # a plain method must not transform the initial model: agents could not rebuild it
        assert "initial_weights" not in vars(entry.server)
    else:
        assert isinstance(entry.agent, AgentHalf)
        assert callable(entry.agent.hooks)
        assert len(inspect.signature(entry.agent.hooks).parameters) == 4  # (params, model, weights, data)
        # a server half that changes the initial model needs its agent-side rebuild, unless
        # the change needs data only the server holds (FedTiny's pre-training set): agents
        # then download the round-0 model (the rebuild fails the task's sha256)
        if "initial_weights" in vars(entry.server) and "labelled_set" not in vars(entry.server):
            assert entry.agent.initial_weights is not None, name


def test_registry_and_server_view_agree() -> None:
    assert {n: r.server for n, r in REGISTRY.items()} == STRATEGIES
    assert set(REGISTRY) == {"fedavg", "structured", "feddip", "fedtiny", "autoflip", "dynamic"}


def test_unknown_names_and_bad_params_are_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("fedprox", {})
    with pytest.raises(ValueError, match="unknown strategy"):
        agent_half("fedprox")  # no silent plain training for a method the agent lacks
    with pytest.raises(ValueError, match="bad params"):
        build_strategy("fedavg", {"no_such_param": 1})


def test_plain_hooks_are_the_defaults() -> None:
    from strategies import hooks_for

    hooks = hooks_for("fedavg", {}, None, {}, None)  # type: ignore[arg-type]
    assert isinstance(hooks, LocalHooks)
    assert hooks.train and hooks.regularizer is None and hooks.aux is None and hooks.upload_support is None
