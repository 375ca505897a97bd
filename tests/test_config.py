import tomllib
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _flat(table: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_pyproject_lists_exactly_the_schema_defaults():
    listed = _flat(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])
    assert listed == RunConfig().to_flower()


def test_from_flower_reads_overrides_and_keeps_defaults():
    config = RunConfig.from_flower({"reward.rounds": 3, "privacy.epsilon": 4, "model.base": "/x"})
    assert config.reward.rounds == 3
    assert config.privacy.epsilon == 4.0 and isinstance(config.privacy.epsilon, float)
    assert config.model.base == "/x"
    assert config.reward.batch_size == RunConfig().reward.batch_size


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"reward.lerning-rate": 0.1}, "unknown run-config key"),
        ({"reward.rounds": "3"}, "'reward.rounds' must be an integer"),
        ({"privacy.enabled": 1}, "'privacy.enabled' must be true or false"),
        ({"privacy.delta": 2.0}, "privacy.delta must be in (0, 1)"),
        ({"server.optimizer": "sgd"}, "server.optimizer must be"),
        ({"policy.kl-bound": 0.4}, "policy.kl-bound must be >= policy.kl-target"),
        ({"policy.max-grad-norm": 0.0}, "policy.max-grad-norm must be > 0"),
        ({"model.gradient-checkpointing": True}, "cannot be used with DP"),
        ({"model.device": "gpu"}, "model.device must be"),
    ],
)
def test_bad_run_config_names_the_key(flat, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_flower(flat)


def test_round_trip_through_flat_form():
    config = RunConfig().replace(**{"federation.secure-aggregation": False, "reward.rounds": 7})
    assert RunConfig.from_flower(config.to_flower()) == config
