"""The Airflow DAG and the Kubeflow PyTorchJob, checked without Airflow or a cluster.

The DAG file is parsed (ast), never imported: Airflow is not installed in the project venv.
deploy/airflow/test_dag.sh runs it for real with dag.test() in its own venv.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import yaml

from recforge.pipeline import STEPS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DAG_FILE = DEPLOY / "airflow" / "recforge_dag.py"


def _dag_tree() -> ast.Module:
    return ast.parse(DAG_FILE.read_text(), filename=str(DAG_FILE))


def _literal(tree: ast.Module, name: str) -> object:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} is not assigned in {DAG_FILE}")


def _names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.List):
        return [n for elt in node.elts for n in _names(elt)]
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        return [f"{node.value.id}[{ast.unparse(node.slice)}]"]
    return [ast.unparse(node)]


def _edges(tree: ast.Module) -> set[tuple[str, str]]:
    """Every `a >> b >> [c, d]` in the file as (a, b), (b, c), (b, d)."""
    edges: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.BinOp) and isinstance(node.value.op, ast.RShift):
            chain, current = [], node.value
            while isinstance(current, ast.BinOp) and isinstance(current.op, ast.RShift):
                chain.insert(0, current.right)
                current = current.left
            chain.insert(0, current)
            for left, right in zip(chain, chain[1:], strict=False):
                edges |= {(a, b) for a in _names(left) for b in _names(right)}
    return edges


def test_dag_runs_the_pipeline_steps_in_order_with_the_gate_as_a_branch():
    tree = _dag_tree()
    steps, after = _literal(tree, "STEPS"), _literal(tree, "AFTER_PASS")
    assert [*steps, *after, "promote"] == list(STEPS)  # the same steps, in the CLI's order
    assert steps[-1] == "gate"
    edges = _edges(tree)
    assert ("upstream", "downstream") in edges  # the cycle steps chained pairwise, in list order
    assert ("cycle[-1]", "check_gate") in edges
    assert {("check_gate", "publish"), ("check_gate", "skip_publish")} <= edges
    assert {("publish", "canary"), ("canary", "promote"), ("skip_publish", "promote")} <= edges
    source = DAG_FILE.read_text()
    assert re.search(r"BranchPythonOperator\(task_id=\"check_gate\", python_callable=choose_branch\)", source)
    assert 'trigger_rule="none_failed_min_one_success"' in source  # promote runs on either branch
    assert '"--step", step' in source and "KubernetesPodOperator" in source and "BashOperator" in source
    assert '"nvidia.com/gpu": TRAIN_GPUS} if step == "train"' in source


def test_branch_follows_the_gate_decision():
    tree = _dag_tree()
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "choose_branch")
    namespace: dict = {"json": json, "Any": object}
    exec(compile(ast.Module(body=[func], type_ignores=[]), str(DAG_FILE), "exec"), namespace)
    choose = namespace["choose_branch"]

    class TaskInstance:  # what Airflow hands the callable: the gate task's XCom
        def __init__(self, value: object) -> None:
            self.value = value

        def xcom_pull(self, task_ids: str) -> object:
            assert task_ids == "gate"
            return self.value

    line = json.dumps({"decision": "pass", "cycle": "0001"})
    assert choose(ti=TaskInstance(f"progress...\n{line}")) == "publish"  # BashOperator: last stdout line
    assert choose(ti=TaskInstance({"decision": "pass"})) == "publish"  # pod: /airflow/xcom/return.json
    assert choose(ti=TaskInstance(json.dumps({"decision": "refuse"}))) == "skip_publish"
    assert choose(ti=TaskInstance(json.dumps({"decision": "no_new_data"}))) == "skip_publish"


def test_pytorchjob_runs_torchrun_with_one_rank_per_gpu_and_mirrors_checkpoints():
    job = yaml.safe_load((DEPLOY / "k8s" / "pytorchjob.yaml").read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    for spec in replicas.values():
        pod = spec["template"]["spec"]
        container = next(c for c in pod["containers"] if c["name"] == "pytorch")
        command = " ".join(container["command"] + container["args"])
        env = {e["name"]: e["value"] for e in container["env"]}
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert "torchrun" in command and "-m recforge.train" in command
        assert '--nproc_per_node="$GPUS_PER_NODE"' in command and int(env["GPUS_PER_NODE"]) == int(gpus)
        assert '--nnodes="$WORLD_SIZE"' in command and '--node_rank="$RANK"' in command
        assert "train.device=cuda" in command and "--resume" in command
        assert {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "TORCH_NCCL_ASYNC_ERROR_HANDLING"} <= set(env)
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["data"] == "/data" and mounts["shm"] == "/dev/shm"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "persistentVolumeClaim" in volumes["data"]
        assert env["CHECKPOINT_URI"].startswith("s3://") and "fs.put" in command
        sidecar = next(c for c in pod["initContainers"] if c["name"] == "mirror-checkpoints")
        assert sidecar["restartPolicy"] == "Always" and "fs.put" in " ".join(sidecar["args"])
        restore = next(c for c in pod["initContainers"] if c["name"] == "restore-checkpoints")
        assert "fs.get" in " ".join(restore["args"])
