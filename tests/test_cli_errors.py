"""The CLI's error boundary: an expected failure is one line on stderr and exit 1, never a traceback."""

from __future__ import annotations

import pickle
import zipfile

import pytest
import typer

from recforge import cli


@pytest.mark.parametrize("exc", [
    EOFError("Ran out of input"),
    pickle.UnpicklingError("invalid load key, 'x'."),
    zipfile.BadZipFile("File is not a zip file"),
    ValueError("runs/x/checkpoints/last.pt: checkpoint is damaged\nsecond line"),
    IndexError("list index out of range"),
])
def test_an_expected_failure_is_one_line_and_exit_1(exc: Exception, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECFORGE_DEBUG", raising=False)

    def fail() -> None:
        raise exc

    with pytest.raises(typer.Exit) as stopped:
        cli._run(fail)
    assert stopped.value.exit_code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(exc).splitlines()[0] in lines[0]


def test_a_bug_keeps_its_traceback() -> None:
    def bug() -> None:
        raise TypeError("unsupported operand")

    with pytest.raises(TypeError):
        cli._run(bug)
