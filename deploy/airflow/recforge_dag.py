"""Airflow DAG for recforge continuous training: one task per `recforge pipeline run --step NAME`.

    ingest >> prepare >> features >> train >> export >> evaluate >> gate >> check_gate -> publish >> canary -> promote
                                                                                       -> skip_publish ------> promote

Every task runs the same CLI step a person can run by hand, so the DAG holds no training logic.
The gate's JSON decision (the last stdout line of `--step gate`, or /airflow/xcom/return.json in a
pod) picks the branch; promote runs on both branches, since a canary matures whether or not this
cycle produced a new one.

Where tasks run (env RECFORGE_AIRFLOW_MODE, else the Airflow Variable `recforge_mode`):
  local       BashOperator with RECFORGE_BIN (default `recforge`) on the worker.
  kubernetes  KubernetesPodOperator with RECFORGE_IMAGE; the train step asks for GPUs
              (RECFORGE_TRAIN_GPUS, default 1); data and state on the PVC RECFORGE_PVC at /data,
              configs from the ConfigMap RECFORGE_CONFIG_MAP at /config (configs/pipeline/kubernetes.yaml).
RECFORGE_PIPELINE_CONFIG names the pipeline YAML (default configs/pipeline/synthetic.yaml).
"""

from __future__ import annotations

import json
import os
import shlex
from datetime import datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.bash import BashOperator
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.python import BranchPythonOperator
from airflow.sdk import DAG

STEPS = ["ingest", "prepare", "features", "train", "export", "evaluate", "gate"]
AFTER_PASS = ["publish", "canary"]
XCOM_FILE = "/airflow/xcom/return.json"


def _mode() -> str:
    mode = os.environ.get("RECFORGE_AIRFLOW_MODE")
    if mode:
        return mode
    try:
        from airflow.sdk import Variable

        return str(Variable.get("recforge_mode", default="local"))
    except Exception:  # no metadata database reachable while parsing: the local default
        return "local"


MODE = _mode()
CONFIG = os.environ.get("RECFORGE_PIPELINE_CONFIG", "configs/pipeline/synthetic.yaml")
RECFORGE = os.environ.get("RECFORGE_BIN", "recforge")
IMAGE = os.environ.get("RECFORGE_IMAGE", "recforge/app:0.1.0")
TRAIN_GPUS = os.environ.get("RECFORGE_TRAIN_GPUS", "1")
PVC = os.environ.get("RECFORGE_PVC", "recforge-data")
CONFIG_MAP = os.environ.get("RECFORGE_CONFIG_MAP", "recforge-pipeline-config")
RETRIES = int(os.environ.get("RECFORGE_AIRFLOW_RETRIES", "1"))


def _args(step: str) -> list[str]:
    return ["pipeline", "run", "--config", CONFIG, "--step", step]


def _task(step: str, **kwargs: Any) -> Any:
    if MODE == "kubernetes":
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from kubernetes.client import models as k8s

        gpus = {"nvidia.com/gpu": TRAIN_GPUS} if step == "train" else {}
        return KubernetesPodOperator(
            task_id=step, name=f"recforge-{step}", image=IMAGE, cmds=["recforge"],
            arguments=[*_args(step), "--json-out", XCOM_FILE], do_xcom_push=True,
            container_resources=k8s.V1ResourceRequirements(limits={"memory": "16Gi", **gpus},
                                                           requests={"cpu": "2", "memory": "8Gi"}),
            volumes=[k8s.V1Volume(name="data", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                         claim_name=PVC)),
                     k8s.V1Volume(name="config", config_map=k8s.V1ConfigMapVolumeSource(name=CONFIG_MAP))],
            volume_mounts=[k8s.V1VolumeMount(name="data", mount_path="/data"),
                           k8s.V1VolumeMount(name="config", mount_path="/config", read_only=True)],
            env_vars={"RECFORGE_USER": "airflow"}, get_logs=True, **kwargs)
    command = " ".join(shlex.quote(part) for part in [RECFORGE, *_args(step)])
    return BashOperator(task_id=step, bash_command=command, env={"RECFORGE_USER": "airflow"}, append_env=True,
                        **kwargs)


def choose_branch(**context: Any) -> str:
    """publish when the gate passed; skip_publish on refuse or no new data."""
    raw = context["ti"].xcom_pull(task_ids="gate")
    decision = raw if isinstance(raw, dict) else json.loads(str(raw).strip().splitlines()[-1])
    return "publish" if decision.get("decision") == "pass" else "skip_publish"


with DAG(
    dag_id="recforge_continuous_training",
    description="ingest -> train challenger -> gate vs champion -> publish -> canary -> promote",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # two cycles at once would race for the same open cycle
    default_args={"retries": RETRIES, "retry_delay": timedelta(minutes=5)},
    tags=["recforge"],
) as dag:
    cycle = [_task(step) for step in STEPS]
    for upstream, downstream in zip(cycle, cycle[1:], strict=False):
        upstream >> downstream
    check_gate = BranchPythonOperator(task_id="check_gate", python_callable=choose_branch)
    skip_publish = EmptyOperator(task_id="skip_publish")
    publish, canary = (_task(step) for step in AFTER_PASS)
    promote = _task("promote", trigger_rule="none_failed_min_one_success")
    cycle[-1] >> check_gate >> [publish, skip_publish]
    publish >> canary >> promote
    skip_publish >> promote
