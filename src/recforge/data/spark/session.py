"""The SparkSession a preparation runs in: master and settings from config, Python workers on our interpreter.

Executors run recforge's own row rules (validation, encoding, negatives) as Arrow functions, so
they need the interpreter (and environment) that has recforge installed: locally that is this one;
on a cluster it is the image or environment the executors were given (docs/spark.md).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from recforge.config import SparkConfig
from recforge.runtime import require_java

# Settings recforge relies on; data.spark.conf may override any of them.
_DEFAULTS = {
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "65536",
    # Adaptive execution may coalesce the partitions of a range sort; the dense numbering
    # (keys.dense_index) reads partitions in order and needs them as planned.
    "spark.sql.adaptive.enabled": "false",
    "spark.sql.session.timeZone": "UTC",
}


def _local_master(master: str | None) -> bool:
    return master is not None and master.startswith("local")


@contextlib.contextmanager
def spark_session(cfg: SparkConfig, app: str = "recforge-prepare") -> Iterator[Any]:
    """A session for one preparation; stopped afterwards unless it was already running (a notebook, a test)."""
    require_java()
    from pyspark.sql import SparkSession

    existing = SparkSession.getActiveSession()
    if existing is not None:
        yield existing
        return
    # The Python workers of a local master are started with PYSPARK_PYTHON (spark.pyspark.python is read
    # by spark-submit only); they run recforge's code, so they need this interpreter.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app)
    if cfg.master:
        builder = builder.master(cfg.master)
    settings = dict(_DEFAULTS)
    if _local_master(cfg.master):
        settings.update({"spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "8"})
    settings.update(cfg.conf)
    for key, value in settings.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    try:
        yield session
    finally:
        session.stop()
