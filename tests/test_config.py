"""The config boundary: strict keys, every problem reported at once, overrides parsed as YAML."""

from __future__ import annotations

import pytest

from recforge import config


def test_overrides_are_parsed_as_yaml_and_merged_into_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 7, lr: 0.5}\ndata: {schema: {context: [hour]}}\n")
    cfg = config.load(path, ["train.lr=1e-3", "model.hidden=[8, 4]", "data.schema.numeric=[]"])
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.001
    assert cfg.model.hidden == [8, 4]
    assert cfg.data.schema_.context == ["hour"] and cfg.data.schema_.numeric == []


def test_every_problem_is_named_at_once():
    with pytest.raises(config.ConfigError) as err:
        config.load(None, ["train.lr_rate=1", "model.widht=3", "train.epochs=0"])
    message = str(err.value)
    assert "unknown config key 'train.lr_rate'" in message
    assert "unknown config key 'model.widht'" in message
    assert "train.epochs" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.lr"], "not of the form key=value"),
        (["=3"], "not of the form key=value"),
        (["seed=3", "seed.sub=4"], "'seed' is a value, not a section"),
        (["model.hidden=[1, 2"], "not valid YAML"),
    ],
)
def test_malformed_overrides_fail_with_the_reason(overrides, expected):
    with pytest.raises(config.ConfigError, match=expected):
        config.load(None, overrides)


def test_bad_files_and_cross_field_rules(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(config.ConfigError, match="mapping"):
        config.load(tmp_path / "list.yaml")
    with pytest.raises(config.ConfigError, match="below 1"):
        config.load(None, ["data.split.valid_fraction=0.5", "data.split.test_fraction=0.5"])
    with pytest.raises(config.ConfigError, match="more than one role"):
        config.load(None, ["data.schema.context=[user_id]"])
    with pytest.raises(config.ConfigError, match="needs data.schema.split"):
        config.load(None, ["data.split.method=column"])
    with pytest.raises(config.ConfigError, match="set data.split.method=column"):
        config.load(None, ["data.schema.split=fold"])
    with pytest.raises(config.ConfigError, match="more than one role"):
        config.load(None, ["data.schema.split=device", "data.split.method=column"])
    assert config.load(None, ["data.split.test_fraction=0"]).data.split.test_fraction == 0
    assert config.load(None, ["train.early_stopping_metric=ndcg@50"]).train.early_stopping_metric == "ndcg@50"
    for metric in ("ndcg@0", "map@10", "recall@", "auc@5"):
        with pytest.raises(config.ConfigError, match="early_stopping_metric"):
            config.load(None, [f"train.early_stopping_metric={metric}"])


def test_config_is_frozen():
    cfg = config.load()
    with pytest.raises(Exception, match="frozen"):
        cfg.train.epochs = 9  # type: ignore[misc]
