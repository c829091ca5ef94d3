"""The CLI's `--json` convention: every command that produces a result takes `--json`, and then its
stdout is exactly one JSON value (human text goes to stderr), so scripts can parse it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from recforge.cli import app
from recforge.config import split_assignment

FIXTURE_BUNDLE = Path(__file__).parent / "fixtures" / "bundle_schema1"
# Commands that produce no result to print: the server runs until stopped.
NO_RESULT = {"serve"}


def _leaf_commands(group: object, prefix: str = "") -> dict[str, object]:
    """Every command under `group` by its full name ("registry list"); groups are walked, not listed."""
    found: dict[str, object] = {}
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if hasattr(command, "commands"):  # a group (typer bundles its own click, so no isinstance)
            found.update(_leaf_commands(command, path + " "))
        else:
            found[path] = command
    return found


def test_every_result_producing_command_has_a_json_option() -> None:
    commands = _leaf_commands(typer.main.get_command(app))
    assert set(commands) >= NO_RESULT  # the allow-list names real commands, not stale ones
    assert {"data validate", "registry list", "pipeline run", "events export"} <= set(commands)
    missing = [path for path, command in commands.items() if path not in NO_RESULT
               and not any("--json" in param.opts for param in command.params)]
    assert missing == [], f"commands without --json: {missing}"


def _one_json(args: list[str]) -> object:
    """Run the CLI in-process; stdout must parse as exactly one JSON value."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)  # raises on extra text or a second value


@pytest.fixture
def registry_root(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    root.mkdir()
    return root


def test_registry_commands_print_one_json_value(registry_root: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(FIXTURE_BUNDLE, bundle)
    reg = ["--registry", str(registry_root)]
    assert _one_json(["registry", "publish", "ranker", str(bundle), *reg, "--json"])["version"] == 1
    assert _one_json(["registry", "publish", "ranker", str(bundle), *reg, "--note", "second", "--json"])[
        "version"] == 2
    assert [v["number"] for v in _one_json(["registry", "list", "ranker", *reg, "--json"])] == [1, 2]
    assert _one_json(["registry", "show", "ranker", "2", *reg, "--json"])["note"] == "second"
    assert _one_json(["registry", "promote", "ranker", "1", *reg, "--json"])["to"] == 1
    assert _one_json(["registry", "promote", "ranker", "2", *reg, "--json"])["to"] == 2
    assert _one_json(["registry", "rollback", "ranker", *reg, "--json"])["to"] == 1
    assert len(_one_json(["registry", "history", "ranker", *reg, "--json"])) == 3
    assert _one_json(["registry", "diff", "ranker", "1", "2", *reg, "--json"])["b"]["version"] == 2
    assert _one_json(["registry", "gc", "ranker", *reg, "--json"]) == {"model": "ranker", "removed": []}


def test_data_validate_prints_one_json_value(tmp_path: Path) -> None:
    rows = ["user_id,item_id,timestamp,hour,device,category,position,label",
            "1,10,1700000000,3,ios,5,0,1",
            ",10,1700000001,3,ios,5,0,1"]
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    report = _one_json(["data", "validate", f"data.source={tmp_path / 'events.csv'}", f"workdir={tmp_path}",
                        "--out", str(tmp_path / "v"), "--json"])
    assert (report["rows_read"], report["rows_kept"]) == (2, 1)


def test_the_module_entry_point_keeps_stdout_to_one_json_value(registry_root: Path, tmp_path: Path) -> None:
    """`python -m recforge.cli` (what tests and the simulator run without a venv script) is the real process."""
    bundle = tmp_path / "bundle"
    shutil.copytree(FIXTURE_BUNDLE, bundle)
    proc = subprocess.run([sys.executable, "-m", "recforge.cli", "registry", "publish", "ranker", str(bundle),
                           "--registry", str(registry_root), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version"] == 1
    assert "published" in proc.stderr  # the human line still goes to stderr


@pytest.mark.parametrize(("text", "expected"), [
    ("hour=20", ("hour", "20")),
    (" hour =a=b", ("hour", "a=b")),  # the first `=` splits; the name is stripped, the value kept as given
    ("empty=", ("empty", "")),
])
def test_split_assignment_reads_name_and_value(text: str, expected: tuple[str, str]) -> None:
    assert split_assignment(text, "--context", "FIELD=VALUE") == expected


@pytest.mark.parametrize("text", ["hour", "=20", "  =20"])
def test_split_assignment_names_the_flag_and_form(text: str) -> None:
    with pytest.raises(ValueError, match=rf"^--set {text!r} is not NAME=VALUE$"):
        split_assignment(text, "--set", "NAME=VALUE")


@pytest.mark.parametrize(("args", "message"), [
    (["recommend", "--user", "1", "--context", "hour"], "--context 'hour' is not FIELD=VALUE"),
    (["plan", "--field", "user_id=many"], "--field 'user_id=many' is not NAME=ROWS"),
    (["serve", "--set", "max_k"], "--set 'max_k' is not NAME=VALUE"),
])
def test_malformed_pairs_fail_with_one_line_naming_the_flag(args: list[str], message: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECFORGE_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.strip() == f"error: {message}"


def test_quickstart_json_replaces_the_tables_with_one_object(tmp_path: Path) -> None:
    """The one command whose `--json` changes what it prints: the tables give way to every step's figures."""
    result = _one_json(["quickstart", "--json", f"workdir={tmp_path / 'w'}", "data.generate.events=3000",
                        "data.generate.users=100", "data.generate.items=50", "train.epochs=1"])
    assert set(result["test"]) == {"model", "popularity"}
    assert result["rows_kept"] <= result["rows_read"] == result["generate"]["rows"]
    assert Path(result["run_dir"]).is_dir()


def test_data_generate_and_prepare_print_one_json_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two commands whose stdout is JSON even without the flag: with it, still exactly one value."""
    monkeypatch.chdir(tmp_path)
    world = [f"workdir={tmp_path}", "data.generate.users=60", "data.generate.items=40",
             "data.generate.events=3000", "data.generate.days=4"]
    generated = _one_json(["data", "generate", *world, "--json"])
    prepared = _one_json(["data", "prepare", *world, "--json"])
    assert generated["rows"] == 3000 and len(generated["files"]) == 4
    assert prepared["rows"] == 3000 and sum(prepared["splits"].values()) == 3000
