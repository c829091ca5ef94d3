"""The running A/B experiments as a file: parsed, validated, written, and followed across workers.

With several workers, PUT /admin/experiments reaches one of them; the file is how the others learn
of it (each compares the file's mtime on its registry poll).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from recforge.serve import ab
from recforge.storage import write_text


def experiments_from(obj: Any) -> tuple[ab.Experiment, ...]:
    """Experiments from the file/body shape {"experiments": [{name, salt, variants: [...]}, ...]}."""
    from recforge.serve.schemas import ExperimentsBody

    body = ExperimentsBody.model_validate(obj)
    experiments = tuple(ab.Experiment(e.name, e.salt, tuple(ab.Variant(v.name, v.weight, v.ranker, v.retrieval)
                                                             for v in e.variants)) for e in body.experiments)
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise ValueError(f"experiment names must be unique, got {names}")
    return experiments


def experiments_to(experiments: Sequence[ab.Experiment]) -> dict[str, Any]:
    return {"experiments": [{"name": e.name, "salt": e.salt, "variants": [
        {"name": v.name, "weight": v.weight, "ranker": v.ranker, "retrieval": v.retrieval} for v in e.variants]}
        for e in experiments]}


def load_experiments_file(path: Path) -> tuple[ab.Experiment, ...]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {"experiments": []}
        return experiments_from(data)
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise ValueError(f"experiments file {path}: {str(exc).strip().splitlines()[0]}") from exc


class ExperimentsFile:
    """The experiments file of one server (or none), and the version of it this process last read or wrote."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._mtime = _mtime(path)

    def initial(self) -> tuple[ab.Experiment, ...]:
        return load_experiments_file(self.path) if self.path is not None else ()

    def write(self, experiments: Sequence[ab.Experiment]) -> None:
        if self.path is not None:
            write_text(self.path, yaml.safe_dump(experiments_to(experiments), sort_keys=False))
            self._mtime = _mtime(self.path)

    def changed(self) -> tuple[ab.Experiment, ...] | None:
        """The file's experiments when another process rewrote it since this one last looked, else None."""
        mtime = _mtime(self.path)
        if self.path is None or mtime is None or mtime == self._mtime:
            return None
        experiments = load_experiments_file(self.path)
        self._mtime = mtime
        return experiments


def _mtime(path: Path | None) -> int | None:
    try:
        return None if path is None else path.stat().st_mtime_ns
    except OSError:
        return None
