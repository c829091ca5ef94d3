#!/usr/bin/env bash
# Runs the recforge Airflow DAG for real with `dag.test()` on a tiny synthetic world, twice:
# the first run must take the publish branch (no champion yet), the second (no new data) must
# take skip_publish. Airflow lives in its own venv (.venv-airflow): its pins conflict with .venv.
#   deploy/airflow/test_dag.sh            # creates .venv-airflow on first use (pip, from PyPI)
#   AIRFLOW_VENV=/path deploy/airflow/test_dag.sh
#   deploy/airflow/test_dag.sh --install-only   # only create .venv-airflow (make test overlaps it with pytest)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${AIRFLOW_VENV:-$ROOT/.venv-airflow}"
RECFORGE="$ROOT/.venv/bin/recforge"
[ -x "$RECFORGE" ] || { echo "error: $RECFORGE not found; build the project venv first (make quickstart or make test)" >&2; exit 1; }

started=$(date +%s)
if [ ! -x "$VENV/bin/airflow" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$ROOT/deploy/airflow/requirements.txt" \
    -c "$ROOT/deploy/airflow/constraints-3.11.txt" 2> >(grep -v "is ignored: it is neither" >&2)
fi
installed=$(date +%s)
if [ "${1:-}" = "--install-only" ]; then
  echo "airflow venv ready in $((installed - started))s: $VENV"
  exit 0
fi

WORK="$(mktemp -d)"
# Kept on failure (airflow logs, pipeline state and run logs are under it), removed on success.
trap 'if [ $? -ne 0 ]; then echo "test_dag.sh failed; files kept in $WORK" >&2; else rm -rf "$WORK"; fi' EXIT
cat > "$WORK/train.yaml" <<YAML
seed: 1
data:
  format: parquet
  generate: {users: 2000, items: 500, events: 40000, days: 4, seed: 3}
model: {name: dnn, embedding_dim: 8, hidden: [32], dropout: 0.0}
train: {epochs: 1, batch_size: 1024, lr: 0.01, progress: false, threads: 1, eval_batch_size: 8192}
YAML
"$RECFORGE" data generate --config "$WORK/train.yaml" "workdir=$WORK/gen" > /dev/null 2>&1
cat > "$WORK/pipeline.yaml" <<YAML
events_dir: $WORK/gen/raw/events
state_dir: $WORK/state
registry: $WORK/registry
training: {config: $WORK/train.yaml}
gate: {calibration_tolerance: 1.0, bootstrap_samples: 500}
canary_min_age_s: 3600
YAML

export AIRFLOW_HOME="$WORK/airflow" AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__CORE__DAGS_FOLDER="$ROOT/deploy/airflow"
export RECFORGE_AIRFLOW_MODE=local RECFORGE_BIN="$RECFORGE" RECFORGE_PIPELINE_CONFIG="$WORK/pipeline.yaml"
export RECFORGE_AIRFLOW_RETRIES=0
"$VENV/bin/airflow" db migrate > "$WORK/db.log" 2>&1 || { cat "$WORK/db.log" >&2; exit 1; }
"$VENV/bin/python" - "$ROOT/deploy/airflow/recforge_dag.py" "$WORK" <<'PY'
import importlib.util
import json
import sys
from pathlib import Path

path, work = sys.argv[1], Path(sys.argv[2])
spec = importlib.util.spec_from_file_location("recforge_dag", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
dag = module.dag


def run(expect_branch: str) -> None:
    dagrun = dag.test()
    states = {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in dagrun.get_task_instances()}
    print(json.dumps({"dag_run": str(getattr(dagrun.state, "value", dagrun.state)), "tasks": states}))
    assert str(getattr(dagrun.state, "value", dagrun.state)) == "success", states
    skipped = "skip_publish" if expect_branch == "publish" else "publish"
    assert states[expect_branch] == "success" and states[skipped] == "skipped", states
    assert states["promote"] == "success", states


run("publish")
aliases = json.loads((work / "registry" / "ranker" / "aliases.json").read_text())
assert aliases == {"canary": 1}, aliases
run("skip_publish")  # no new data: the gate says no_new_data and nothing is published
assert sorted(p.name for p in (work / "registry" / "ranker" / "versions").iterdir()) == ["1"]
print("airflow DAG: publish branch, then skip_publish branch: ok")
PY
finished=$(date +%s)
echo "install: $((installed - started))s, dag runs: $((finished - installed))s"
