"""The report read from parquet logs shaped like the inference service's: totals, shape, SRM, CUPED, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _ab_synth import write_log

from recforge.experiments import stats
from recforge.experiments.plot import plot_report
from recforge.experiments.report import ab_report

START = 1_700_000_000
COMPARISON_FIELDS = {"metric", "treatment", "control", "abs_lift", "abs_ci", "rel_lift", "rel_ci", "p_value",
                     "p_holm", "significant"}


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("ablog") / "events"
    return root, write_log(root, seed=4, users_per_variant={"control": 500, "treatment": 500, "big": 500},
                           lift=0.1, start=START)


def test_totals_per_variant_match_the_raw_rows(log):
    root, rows = log
    report = ab_report(str(root), "ranker_ab")
    assert list(report["variants"]) == ["control", "big", "treatment"]  # control first
    for name, v in report["variants"].items():
        mine = rows["variant"] == name
        assert v["users"] == len(np.unique(rows["user"][mine]))
        assert v["impressions"] == int(mine.sum())
        assert v["clicks"] == int(rows["label"][mine].sum())
        assert v["ctr"] == pytest.approx(v["clicks"] / v["impressions"])
        assert v["ctr_ci"][0] < v["ctr"] < v["ctr_ci"][1]


def test_report_shape_holm_and_mde(log):
    report = json.loads(json.dumps(ab_report(str(log[0]), "ranker_ab")))  # JSON-clean: no NaN
    comparisons = report["comparisons"]
    assert len(comparisons) == 3 * 2  # three metrics x two treatments, one Holm family
    assert {c["metric"] for c in comparisons} == {"ctr", "clicks_per_user", "impressions_per_user"}
    for c in comparisons:
        assert set(c) >= COMPARISON_FIELDS
        assert c["p_holm"] >= c["p_value"] and c["significant"] == (c["p_holm"] < 0.05)
        assert c["abs_ci"][0] <= c["abs_lift"] <= c["abs_ci"][1]
    assert [c["p_holm"] for c in comparisons] == pytest.approx(stats.holm([c["p_value"] for c in comparisons]))
    assert report["srm"]["flagged"] is False and set(report["srm"]) >= {"chi2", "p_value", "flagged"}
    assert report["mde"]["ctr"]["treatment"]["abs"] > 0
    assert report["cuped"] == {"enabled": False}


def test_string_user_ids_give_the_same_report(tmp_path, log):
    root = tmp_path / "string_ids"
    write_log(root, seed=4, users_per_variant={"control": 500, "treatment": 500, "big": 500}, lift=0.1,
              start=START, string_ids=True)
    a, b = ab_report(str(log[0]), "ranker_ab"), ab_report(str(root), "ranker_ab")
    assert a["variants"] == b["variants"] and a["comparisons"] == b["comparisons"]


def test_srm_is_flagged_prominently(tmp_path):
    root = tmp_path / "srm"
    write_log(root, seed=1, users_per_variant={"control": 1000, "treatment": 820})
    report = ab_report(str(root), "ranker_ab")
    assert report["srm"]["flagged"] is True and report["srm"]["p_value"] < 1e-3
    assert any("SAMPLE RATIO MISMATCH" in w for w in report["warnings"])
    # ... unless that split was intended.
    assert ab_report(str(root), "ranker_ab", weights="control=50,treatment=41")["srm"]["flagged"] is False


def _table(user_ids: list, assignments: list, labels: list | None = None) -> pa.Table:
    n = len(user_ids)
    return pa.table({"user_id": user_ids, "item_id": list(range(n)), "timestamp": [START + i for i in range(n)],
                     "label": labels or [i % 2 for i in range(n)], "assignments": assignments,
                     "request_id": [f"r{i}" for i in range(n)], "model_version": ["m1"] * n})


def test_rows_outside_the_experiment_and_mixed_users_are_excluded(tmp_path):
    a = json.dumps({"ranker_ab": "control"})
    b = json.dumps({"ranker_ab": "treatment", "other": "x"})
    other = json.dumps({"other": "x"})
    pq.write_table(_table([1, 1, 2, 2, 3, 3, 4, 5, 5, 9, 6],
                          [a, a, b, b, a, b, other, b, None, other, a]), tmp_path / "day1.parquet")
    (tmp_path / "_SUCCESS").write_text("")  # markers and hidden temp files are skipped
    report = ab_report(str(tmp_path), "ranker_ab")
    assert report["users_in_several_variants"] == 1  # user 3 saw both arms
    assert report["variants"]["control"]["users"] == 2 and report["variants"]["control"]["impressions"] == 3
    assert report["variants"]["treatment"]["users"] == 2 and report["variants"]["treatment"]["impressions"] == 3
    assert any("more than one variant" in w for w in report["warnings"])


def test_cuped_from_a_pre_period_timestamp_or_a_separate_log_agree(tmp_path, log):
    root = log[0]
    split = START + 86400  # day 0 is the pre-period
    by_time = ab_report(str(root), "ranker_ab", cuped=True, pre_period_end=split)
    days = sorted(root.iterdir())
    later = tmp_path / "later"
    for day in days[1:]:
        shutil.copytree(day, later / day.name)
    by_log = ab_report(str(later), "ranker_ab", cuped=True, pre_events_uri=str(days[0]))
    assert by_time["comparisons"] == by_log["comparisons"]
    cuped = by_time["cuped"]
    assert cuped["enabled"] and cuped["users_with_pre_period"] > 1000
    for metric in ("ctr", "clicks_per_user", "impressions_per_user"):
        assert cuped["metrics"][metric]["variance_reduction"] > 0.05, metric
    assert all(c["cuped"] for c in by_time["comparisons"])


def test_plot_writes_a_png(tmp_path, log):
    path = plot_report(ab_report(str(log[0]), "ranker_ab"), tmp_path / "plots" / "ab.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"experiment": "nope"}, "experiments found: other_exp, ranker_ab"),
    ({"experiment": "ranker_ab", "control": "baseline"}, "variants found: big, control, treatment"),
    ({"experiment": "ranker_ab", "cuped": True}, "CUPED needs a pre-period"),
    ({"experiment": "ranker_ab", "pre_period_end": 1}, "add --cuped"),
    ({"experiment": "ranker_ab", "weights": "control:1"}, "not VARIANT=WEIGHT"),
    ({"experiment": "ranker_ab", "weights": "control=1,treatment=1"}, "missing ['big']"),
    ({"experiment": "ranker_ab", "alpha": 1.5}, "alpha"),
])
def test_clear_errors(log, kwargs, message):
    with pytest.raises(ValueError) as info:
        ab_report(str(log[0]), **kwargs)
    assert message in str(info.value)


def test_clear_errors_about_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ab_report(str(tmp_path / "missing"), "ranker_ab")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet files"):
        ab_report(str(tmp_path / "empty"), "ranker_ab")
    pq.write_table(pa.table({"user_id": [1, 2], "label": [0, 1]}), tmp_path / "thin.parquet")
    with pytest.raises(ValueError, match="thin.parquet lacks required column.s. assignments"):
        ab_report(str(tmp_path / "thin.parquet"), "ranker_ab")
    one_user = json.dumps({"ranker_ab": "treatment"})
    pq.write_table(_table([1, 2, 2], [json.dumps({"ranker_ab": "control"}), one_user, one_user]),
                   tmp_path / "one.parquet")
    with pytest.raises(ValueError, match=r"variant\(s\) control \(1\), treatment \(1\) have fewer than 2 users"):
        ab_report(str(tmp_path / "one.parquet"), "ranker_ab")
    pq.write_table(_table([1, 2], ["not json", "{}"]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="'not json' is not a JSON object"):
        ab_report(str(tmp_path / "bad.parquet"), "ranker_ab")


def test_dictionary_encoded_columns_with_a_dictionary_per_file(tmp_path):
    """Logs written from pandas categoricals: each file has its own dictionary for the same column."""
    a, b = json.dumps({"e": "control"}), json.dumps({"e": "treatment"})
    for name, ids, arms in (("x", ["1", "2", "3", "4"], [a, b, a, b]), ("y", ["5", "6", "1"], [b, a, a])):
        pq.write_table(pa.table({"user_id": pa.array(ids).dictionary_encode(), "label": [1] * len(ids),
                                 "assignments": pa.array(arms).dictionary_encode()}), tmp_path / f"{name}.parquet")
    variants = ab_report(str(tmp_path), "e")["variants"]
    assert (variants["control"]["users"], variants["control"]["impressions"]) == (3, 4)
    assert (variants["treatment"]["users"], variants["treatment"]["impressions"]) == (3, 3)
