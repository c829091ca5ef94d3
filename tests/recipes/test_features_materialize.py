"""`features materialize` refuses what would seed wrong histories, before it touches Redis; the pipeline's
online section refuses a state that is not a Redis URL."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from recforge import config
from recforge.pipeline.settings import OnlineSettings
from recforge.recipes.features import materialize_features

# Nothing listens here: a test that got as far as connecting would fail with a Redis error, not the one expected.
NOWHERE = "redis://127.0.0.1:1/0"


def _log(path, labels):
    pq.write_table(pa.table({"user_id": [1, 2, 3], "item_id": [10, 11, 12], "timestamp": [100, 200, 300],
                             "label": labels}), path)
    return config.load(None, [f"workdir={path.parent}", f"data.source={path}", "data.schema.context=[]",
                              "data.schema.item_features=[]", "data.schema.numeric=[]", "data.history_length=5"])


def test_a_length_shorter_than_the_models_histories_is_refused(tmp_path) -> None:
    cfg = _log(tmp_path / "log.parquet", [1, 0, 1])
    with pytest.raises(ValueError, match="length 3 is shorter than data.history_length 5"):
        materialize_features(cfg, NOWHERE, length=3)


def test_a_log_whose_rows_are_all_quarantined_is_refused(tmp_path) -> None:
    cfg = _log(tmp_path / "log.parquet", [7, 8, 9])  # a click label must be 0 or 1
    with pytest.raises(ValueError, match="every row was quarantined"):
        materialize_features(cfg, NOWHERE)


def test_the_pipelines_online_state_must_be_a_redis_url() -> None:
    with pytest.raises(ValidationError, match="state"):
        OnlineSettings(state="local", lake="/tmp/lake")
    assert OnlineSettings(state="rediss://cache:6380/0", lake="s3://b/lake").prefix == "recforge"
