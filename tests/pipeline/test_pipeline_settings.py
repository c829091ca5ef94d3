"""PipelineConfig: strict like every recforge config, and the shipped pipeline configs are valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recforge.config import ConfigError
from recforge.pipeline.settings import PipelineConfig, load_pipeline

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pipeline"


def test_pipeline_config_is_strict_and_checks_the_training_config(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("events_dir: e\nstate_dir: s\nregistry: r\ngate: {alpha: 0.05, alhpa: 1}\n")
    with pytest.raises(ConfigError, match="gate.alhpa"):
        load_pipeline(path)
    path.write_text("events_dir: e\nstate_dir: s\nregistry: r\ntraining: {overrides: [train.lr_rate=1]}\n")
    with pytest.raises(ConfigError, match="train.lr_rate"):
        load_pipeline(path)
    path.write_text("events_dir: e\nstate_dir: s\nregistry: r\n")
    cfg = load_pipeline(path, ["canary_min_age_s=5", "gate.test=ttest"])
    assert cfg.canary_min_age_s == 5 and cfg.gate.test == "ttest" and cfg.model_name == "ranker"


@pytest.mark.parametrize("name", ["synthetic.yaml", "kubernetes.yaml"])
def test_shipped_pipeline_configs_are_valid(name):
    cfg = PipelineConfig.model_validate(yaml.safe_load((CONFIGS / name).read_text()))
    assert cfg.model_name == "ranker" and cfg.canary_min_age_s > 0


def test_the_synthetic_pipeline_config_loads_with_its_training_config(monkeypatch):
    monkeypatch.chdir(CONFIGS.parents[1])
    cfg = load_pipeline(CONFIGS / "synthetic.yaml")
    assert cfg.training_config().model.name == "dnn"


def test_a_retrieval_model_is_refused_before_anything_trains(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("events_dir: e\nstate_dir: s\nregistry: r\ntraining: {overrides: [model.name=two_tower]}\n")
    with pytest.raises(ConfigError, match="two_tower is not supported"):
        load_pipeline(path)


@pytest.mark.parametrize(("content", "message"), [
    (None, "pipeline config not found"),
    ("events_dir: [unclosed", "pipeline config .* is not valid YAML"),
    ("- a list, not a mapping", "pipeline config .* must hold a mapping"),
])
def test_unreadable_pipeline_files_fail_with_the_file_named(tmp_path, content, message):
    path = tmp_path / "pipeline.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_pipeline(path)
