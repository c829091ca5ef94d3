"""The report reads the impression log straight from an S3-compatible store (the session's SeaweedFS)."""

from __future__ import annotations

import pytest
from _ab_synth import write_log

from recforge import storage
from recforge.experiments.report import ab_report

pytestmark = pytest.mark.slow


def test_report_from_s3_matches_the_local_one(tmp_path, s3_prefix):
    root = tmp_path / "events"
    write_log(root, seed=4, users_per_variant={"control": 150, "treatment": 150})
    for f in root.rglob("*.parquet"):
        storage.put_file(f, f"{s3_prefix}/events/{f.relative_to(root).as_posix()}")
    local = ab_report(str(root), "ranker_ab")
    remote = ab_report(f"{s3_prefix}/events/", "ranker_ab")
    assert remote["variants"] == local["variants"] and remote["comparisons"] == local["comparisons"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ab_report(f"{s3_prefix}/missing", "ranker_ab")
