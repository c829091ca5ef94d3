"""Java for Spark preparation: the version found through JAVA_HOME or PATH, and a one-line error when it is missing.

Each test fakes the machine with a JAVA_HOME holding a `bin/java` script that prints what a real
java prints (to stderr), so no test depends on the Java installed here.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from recforge import runtime

OPENJDK_17 = ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment (build 17.0.15+6-Debian-1deb12u1)\n'
              'OpenJDK 64-Bit Server VM (build 17.0.15+6-Debian-1deb12u1, mixed mode, sharing)')
OPENJDK_11 = 'openjdk version "11.0.22" 2024-01-16\nOpenJDK Runtime Environment (build 11.0.22+7)'


def fake_java_home(tmp_path: Path, banner: str, exit_code: int = 0) -> Path:
    home = tmp_path / "jdk"
    (home / "bin").mkdir(parents=True)
    java = home / "bin" / "java"
    echoes = "".join(f"echo '{line}' >&2\n" for line in banner.splitlines())  # builtins only: PATH may be empty
    java.write_text(f"#!/bin/sh\n{echoes}exit {exit_code}\n")
    java.chmod(java.stat().st_mode | stat.S_IXUSR)
    return home


def test_java_17_from_java_home(tmp_path, monkeypatch):
    monkeypatch.setenv("JAVA_HOME", str(fake_java_home(tmp_path, OPENJDK_17)))
    monkeypatch.setenv("PATH", str(tmp_path))  # JAVA_HOME wins; PATH holds no java at all
    assert runtime.java_version() == (17, 'openjdk version "17.0.15" 2025-04-15')
    assert runtime.require_java(17)[0] == 17


def test_java_11_is_too_old_and_the_error_says_what_to_install(tmp_path, monkeypatch):
    home = fake_java_home(tmp_path, OPENJDK_11)
    monkeypatch.setenv("JAVA_HOME", str(home))
    assert runtime.java_version() == (11, 'openjdk version "11.0.22" 2024-01-16')
    with pytest.raises(RuntimeError) as err:
        runtime.require_java(minimum=17)
    message = str(err.value)
    assert "\n" not in message
    assert "Java 17+" in message and "Java 11" in message and str(home) in message
    assert "apt-get install openjdk-17-jre-headless" in message and "JAVA_HOME" in message
    assert runtime.require_java(minimum=11)[0] == 11


def test_absent_java(tmp_path, monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no java anywhere
    assert runtime.java_version() is None
    with pytest.raises(RuntimeError, match=r"no working java on PATH; install it .*openjdk-17-jre-headless") as err:
        runtime.require_java()
    assert "\n" not in str(err.value)
    # A JAVA_HOME without bin/java is no java either, even when PATH has one (Spark reads JAVA_HOME first).
    fake_java_home(tmp_path / "on-path", OPENJDK_17)
    monkeypatch.setenv("PATH", str(tmp_path / "on-path" / "jdk" / "bin"))
    assert runtime.java_version() == (17, 'openjdk version "17.0.15" 2025-04-15')
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "empty"))
    assert runtime.java_version() is None


def test_a_java_that_fails_counts_as_none(tmp_path, monkeypatch):
    monkeypatch.setenv("JAVA_HOME", str(fake_java_home(tmp_path, "Error: could not create the Java VM", 1)))
    assert runtime.java_version() is None


@pytest.mark.parametrize(("line", "major"), [
    ('openjdk version "17.0.15" 2025-04-15', 17),
    ('openjdk version "21" 2023-09-19', 21),
    ('java version "1.8.0_292"', 8),
    ('openjdk version "25-ea" 2025-09-16', 25),
    ("no version here", None),
])
def test_major_version_parsing(line, major):
    assert runtime.parse_java_major(line) == major
