"""bench.paper's settings are runnable as written: every flag parses with fedslim-sim's own
parser, every strategy param builds the strategy, every --config is a valid federation.
(The runs themselves take minutes to hours: `python -m bench.paper --quick`.)

Mutations killed: a misspelt sim flag or strategy param in a setting; --quick not
replacing a flag it names; a `holds` check that is always true or always false."""

from __future__ import annotations

import json

import pytest

from bench.paper import SETTINGS, Setting, _flags
from coordinator.protocol import FederationCreate
from sim.cli import build_parser
from sim.demo import federation_config
from strategies import build_strategy


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.id)
@pytest.mark.parametrize("quick", [False, True])
def test_each_setting_is_a_valid_federation(setting: Setting, quick: bool) -> None:
    args = build_parser().parse_args(["--strategy", setting.method, *_flags(setting, quick), *setting.method_args])
    config = federation_config(args)
    FederationCreate.model_validate(config)  # pydantic: raises on anything out of bounds
    build_strategy(config["strategy"]["name"], config["strategy"]["params"])


def test_quick_replaces_the_flags_it_names() -> None:
    setting = next(s for s in SETTINGS if s.id == "feddip")
    full, quick = _flags(setting, False), _flags(setting, True)
    assert full[full.index("--rounds") + 1] == "30" and quick[quick.index("--rounds") + 1] == "6"
    assert quick.count("--rounds") == 1 and len(quick) == len(full)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.id)
def test_each_check_can_pass_and_fail(setting: Setting) -> None:
    fedavg = {"final_accuracy": 0.85, "mean_last": 0.85, "mb_per_round": 40.0, "macs": 40e6}
    good = {"final_accuracy": 0.10, "mean_last": 0.86, "mb_per_round": 1.0, "macs": 10e6}  # the checks read mean_last
    bad = {"final_accuracy": 0.86, "mean_last": 0.10, "mb_per_round": 80.0, "macs": 40e6}
    assert setting.holds(good, fedavg) and not setting.holds(bad, fedavg)
    assert json.dumps(setting.claim) and setting.check and setting.reduced
