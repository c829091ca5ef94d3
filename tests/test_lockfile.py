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
