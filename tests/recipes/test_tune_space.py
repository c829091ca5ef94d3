"""The search space file: what may be searched, checked against the config before any trial runs."""

from __future__ import annotations

import pytest

from recforge import config
from recforge.recipes.tune import current_values, load_space, with_values


def _space(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_space(path, config.load())


def test_a_space_loads_and_the_configs_own_values_are_its_baseline(tmp_path):
    space = _space(tmp_path, "params:\n  train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
                             "  model.name: {type: categorical, choices: [dnn, deepfm]}\n")
    cfg = config.load()
    assert current_values(cfg, space) == {"train.lr": 1e-3, "model.name": "dnn"}
    assert current_values(with_values(cfg, {"train.lr": 0.5}), space) is None  # outside: no baseline trial
    tuned = with_values(cfg, {"train.lr": 0.002, "model.name": "deepfm"}, run_dir=tmp_path / "r")
    assert (tuned.train.lr, tuned.model.name, tuned.resolved_run_dir) == (0.002, "deepfm", tmp_path / "r")


@pytest.mark.parametrize(("text", "expected"), [
    ("params:\n  train.lr_rate: {type: float, low: 0.1, high: 1}\n", "parameter 'train.lr_rate'.*unknown"),
    ("params:\n  data.history_length: {type: int, low: 1, high: 5}\n", "cannot be tuned"),
    ("params:\n  train.epochs: {type: int, low: 1, high: 5}\n", "cannot be tuned"),
    ("params:\n  train.lr: {type: float, low: 0.1, high: 0.01}\n", "low < high"),
    ("params:\n  train.lr: {type: float, low: 0, high: 0.01, log: true}\n", "low > 0"),
    ("params:\n  model.dropout: {type: categorical, choices: []}\n", "choices"),
    ("params:\n  model.dropout: {type: float, low: 0.5, high: 2.0}\n", "model.dropout"),
    ("params: {}\n", "params"),
    ("params:\n  train.lr: {type: float, low: 0.1, high: 1, spread: 2}\n", "unknown config key"),
])
def test_a_bad_space_is_refused_naming_the_parameter(tmp_path, text, expected):
    with pytest.raises(config.ConfigError, match=expected):
        _space(tmp_path, text)
