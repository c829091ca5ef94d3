"""The simulate config: strict, with the training tree validated up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from recforge.config import ConfigError
from recforge.scenarios import load_simulate


def test_defaults_and_overrides(tmp_path):
    cfg = load_simulate(None, [f"workdir={tmp_path}", "loop.days=3", "training.data.generate.users=500"])
    assert cfg.loop.days == 3 and cfg.requests_per_day == 2000
    train = cfg.train_config(["model.name=two_tower"])
    assert train.data.generate.users == 500 and train.model.name == "two_tower"
    assert train.workdir == str(tmp_path) and train.prepared_dir == str(tmp_path / "prepared")


def test_the_shipped_config_loads():
    cfg = load_simulate(Path(__file__).resolve().parents[2] / "configs" / "simulate" / "synthetic.yaml")
    assert cfg.loop.weak_day is not None and cfg.loop.weak_day < cfg.loop.days


@pytest.mark.parametrize(("override", "named"), [("loop.dayz=3", "loop.dayz"), ("ab.alpha=2", "ab.alpha"),
                                                ("training.train.lr_rate=1", "train.lr_rate")])
def test_bad_keys_are_named(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_simulate(None, [override])


@pytest.mark.parametrize(("content", "message"), [
    (None, "simulate config not found"),
    ("seed: [unclosed", "simulate config .* is not valid YAML"),
    ("- a list", "simulate config .* must hold a mapping"),
])
def test_unreadable_simulate_files_fail_with_the_file_named(tmp_path, content, message):
    path = tmp_path / "simulate.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_simulate(path)
