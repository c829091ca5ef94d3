"""The installed environment is the locked one: every `name==version` in requirements/*.txt is what runs.

A drifted package (installed by hand, upgraded by a transitive install) makes results
unreproducible long before anything fails, so the whole list is compared and every mismatch named.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from packaging.version import Version

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements"
LOCKS = ("lock.txt", "dev-lock.txt")


def normalize(name: str) -> str:
    """PEP 503 names: case, `_`, `.` and `-` do not matter (`typing_extensions` is `typing-extensions`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, str]:
    """`name==version` lines; comments, blank lines, pip options and environment markers are skipped."""
    pins: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version.strip(), f"not an exact pin: {raw!r}"
        pins[normalize(re.sub(r"\[.*\]", "", name).strip())] = version.strip()
    return pins


def same_release(installed: str, locked: str) -> bool:
    """Equal ignoring a local label: the lock says torch 2.13.0, the CPU wheel is 2.13.0+cpu."""
    return Version(installed).public == Version(locked).public


def mismatches(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    found = []
    for name, version in sorted(locked.items()):
        have = installed.get(name)
        if have is None:
            found.append(f"{name}: not installed, locked {version}")
        elif not same_release(have, version):
            found.append(f"{name}: installed {have}, locked {version}")
    return found


def installed_versions() -> dict[str, str]:
    return {normalize(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()
            if dist.metadata["Name"]}


def test_parser_and_comparison_catch_every_kind_of_drift():
    pins = parse_lock("# header\n\nTyping_Extensions==4.16.0  # why\n--find-links x\ntorch==2.13.0\n"
                      "pydantic[email]==2.14.4 ; python_version >= '3.11'\n")
    assert pins == {"typing-extensions": "4.16.0", "torch": "2.13.0", "pydantic": "2.14.4"}
    installed = {"typing-extensions": "4.15.0", "torch": "2.13.0+cpu"}
    assert mismatches(pins, installed) == ["pydantic: not installed, locked 2.14.4",
                                           "typing-extensions: installed 4.15.0, locked 4.16.0"]


def test_installed_versions_equal_the_locks():
    installed = installed_versions()
    problems: list[str] = []
    total = 0
    for lock in LOCKS:
        pins = parse_lock((REQUIREMENTS / lock).read_text())
        total += len(pins)
        problems += [f"{lock}: {line}" for line in mismatches(pins, installed)]
    assert total > 20, "the lock files look empty"
    assert not problems, "environment differs from the lock (pip install -r requirements/lock.txt " \
                         "-r requirements/dev-lock.txt):\n" + "\n".join(problems)


def test_torch_is_pinned_to_2_13_0():
    lines = [line.strip() for line in (REQUIREMENTS / "lock.txt").read_text().splitlines()
             if normalize(re.split(r"[=<>!~ ;\[]", line.strip(), maxsplit=1)[0]) == "torch"]
    assert lines == ["torch==2.13.0"]
    assert parse_lock((REQUIREMENTS / "lock.txt").read_text())["torch"] == "2.13.0"


# --- make audit: known vulnerabilities of the locks ------------------------------------------------


def _audit_module():
    """requirements/audit.py is a standalone script (stdlib only), loaded by path."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("lock_audit", REQUIREMENTS / "audit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _report(*dependencies: dict) -> str:
    import json

    return json.dumps({"dependencies": list(dependencies), "fixes": []})


PINS = {"requests": "2.31.0", "idna": "3.6"}


def test_audit_is_clean_only_when_every_pin_was_looked_up():
    audit = _audit_module()
    verdict = audit.classify(_report({"name": "requests", "version": "2.31.0", "vulns": []},
                                     {"name": "idna", "version": "3.6", "vulns": []}), PINS)
    assert (verdict.status, verdict.exit_code, verdict.audited) == ("clean", 0, 2)
    # pip-audit's own answer when its database knows none of the pins: "No known vulnerabilities", exit 0.
    all_skipped = _report(*({"name": n, "skip_reason": f"Dependency not found on PyPI and could not be audited: {n}"}
                            for n in PINS))
    verdict = audit.classify(all_skipped, PINS)
    assert (verdict.status, verdict.exit_code, verdict.audited) == ("unknown", 2, 0)
    assert [line.split(":")[0] for line in verdict.unaudited] == ["requests", "idna"]
    # A pin the report leaves out, an empty report, no report, a report in another format: unknown.
    verdict = audit.classify(_report({"name": "Requests", "version": "2.31.0", "vulns": []}), PINS)
    assert verdict.status == "unknown" and verdict.unaudited == ["idna: not in pip-audit's report"]
    assert audit.classify(_report(), PINS).status == "unknown"
    verdict = audit.classify(None, PINS, "pip-audit exited 1: ConnectionError: api.osv.dev")
    assert verdict.status == "unknown" and "ConnectionError" in verdict.lines()[0] and len(verdict.unaudited) == 2
    for bad in ("", "[]", '{"dependencies": {}}', '{"dependencies": [{"version": "1"}]}',
                '{"dependencies": [{"name": "requests", "vulns": "none"}, {"name": "idna", "vulns": []}]}'):
        assert audit.classify(bad, PINS).status == "unknown", bad


def test_audit_reports_a_vulnerability_even_when_other_pins_were_not_looked_up():
    audit = _audit_module()
    finding = {"id": "GHSA-9wx4-h78v-vm56", "fix_versions": ["2.32.0"], "aliases": ["CVE-2024-35195"],
               "description": "..."}
    verdict = audit.classify(_report({"name": "requests", "version": "2.31.0", "vulns": [finding]},
                                     {"name": "idna", "skip_reason": "not found"}), PINS)
    assert (verdict.status, verdict.exit_code) == ("vulnerable", 1)
    assert verdict.vulnerable == ["requests 2.31.0: GHSA-9wx4-h78v-vm56 (fixed in: 2.32.0)"]
    assert verdict.unaudited == ["idna: not found"]


def test_audit_reads_every_pin_of_the_locks():
    audit = _audit_module()
    assert audit.locked_pins("# c\n--find-links x\nTyping_Extensions==4.16.0  # why\ntorch===2.13.0\n"
                             "pydantic[email]==2.14.4 ; python_version >= '3.11'\n") == \
        {"typing-extensions": "4.16.0", "torch": "2.13.0", "pydantic": "2.14.4"}
    for lock in LOCKS:
        text = (REQUIREMENTS / lock).read_text()
        assert audit.locked_pins(text) == parse_lock(text), lock


def _pip_audit() -> str | None:
    import shutil

    local = REQUIREMENTS.parent / ".audit-tools" / "bin" / "pip-audit"
    return str(local) if local.is_file() else shutil.which("pip-audit")


def test_real_pip_audit_with_an_unreachable_database_says_unknown(tmp_path):
    """pip-audit itself, pointed at an OSV endpoint nothing listens on: the verdict is unknown, exit 2."""
    import subprocess
    import sys

    import pytest

    pip_audit = _pip_audit()
    if pip_audit is None:
        pytest.skip("pip-audit is not installed (make audit installs it into .audit-tools); the rules above ran")
    lock = tmp_path / "lock.txt"
    lock.write_text("requests==2.31.0\nidna==3.6\n")
    proc = subprocess.run([sys.executable, str(REQUIREMENTS / "audit.py"), "--pip-audit", pip_audit,
                           "--service", "osv", "--osv-url", "http://127.0.0.1:9/v1/query", "--timeout", "2",
                           str(lock)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("audit: unknown: 0 pins looked up"), proc.stderr
    assert "clean" not in proc.stdout + proc.stderr
