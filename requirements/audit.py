#!/usr/bin/env python3
"""Known vulnerabilities of the locked pins, with an answer that is never "clean" by default.

    make audit                                     (pip-audit in a throwaway environment, then this script)
    python requirements/audit.py --pip-audit PATH [--service pypi|osv] [--osv-url URL] LOCK...

pip-audit prints "No known vulnerabilities found" and exits 0 when its database answered for none of
the pins (every pin skipped as "not found"), and a crash on an unreachable service is a traceback. An
audit that could not look a pin up says nothing about it, so the verdict here has three values:

    clean       every locked pin was looked up, none has a known vulnerability   exit 0
    vulnerable  at least one pin has a known vulnerability                       exit 1
    unknown     the database was not reached, or some pins were not looked up    exit 2

`vulnerable` wins over `unknown`: a finding is real even when other pins could not be checked.
The lock files are exact pins, so pip-audit runs with --no-deps --disable-pip: it resolves nothing and
needs only the vulnerability service (PyPI's JSON API, or OSV / an OSV mirror given by --osv-url).
Standard library only, so it runs under any Python 3.11 without the project installed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CLEAN, VULNERABLE, UNKNOWN = "clean", "vulnerable", "unknown"
EXIT_CODES = {CLEAN: 0, VULNERABLE: 1, UNKNOWN: 2}
SHOWN = 10  # pins named per list; an unreachable database skips all of them


def normalize(name: str) -> str:
    """PEP 503 names, as pip-audit reports them (`typing_extensions` is `typing-extensions`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_pins(text: str) -> dict[str, str]:
    """`name==version` (or `===`) lines of a lock; comments, options and markers are skipped."""
    pins: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*===?\s*(\S+)", line)
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


@dataclass
class Verdict:
    status: str
    vulnerable: list[str] = field(default_factory=list)  # "name version: ID (fixed in ...)" per finding
    unaudited: list[str] = field(default_factory=list)  # "name: reason" per pin that was not looked up
    audited: int = 0
    reason: str = ""

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def lines(self) -> list[str]:
        out = [f"audit: {self.status}: {self.audited} pins looked up, {len(self.vulnerable)} known "
               f"vulnerabilities, {len(self.unaudited)} pins not looked up"
               + (f" ({self.reason})" if self.reason else "")]
        out += [f"  vulnerable: {line}" for line in self.vulnerable]
        out += [f"  not looked up: {line}" for line in self.unaudited[:SHOWN]]
        if len(self.unaudited) > SHOWN:
            out.append(f"  ... and {len(self.unaudited) - SHOWN} more not looked up")
        return out


def classify(report_text: str | None, pins: dict[str, str], failure: str = "") -> Verdict:
    """The verdict from pip-audit's JSON report (`-f json`); None when pip-audit wrote no report.

    The report is {"dependencies": [{"name", "version", "vulns": [{"id", "fix_versions", ...}]}
    or {"name", "skip_reason"}], "fixes": [...]}. A pin missing from the report counts as not looked up.
    """
    if report_text is None:
        return Verdict(UNKNOWN, unaudited=[f"{name}: no report" for name in sorted(pins)],
                       reason=failure or "pip-audit wrote no report")
    try:
        report = json.loads(report_text)
        dependencies = report["dependencies"]
        if not isinstance(dependencies, list):
            raise TypeError("dependencies is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        return Verdict(UNKNOWN, reason=f"pip-audit's report is not its JSON format: {exc}")
    verdict = Verdict(UNKNOWN)
    seen: set[str] = set()
    for dep in dependencies:
        if not isinstance(dep, dict) or not isinstance(dep.get("name"), str):
            return Verdict(UNKNOWN, reason=f"pip-audit's report has an entry without a name: {dep!r}")
        name = normalize(dep["name"])
        vulns = dep.get("vulns")
        if "skip_reason" in dep or not isinstance(vulns, list) or not all(isinstance(v, dict) for v in vulns):
            verdict.unaudited.append(f"{name}: {dep.get('skip_reason') or 'no vulnerability list'}")
            continue
        seen.add(name)
        verdict.audited += 1
        for vuln in vulns:
            fixes = ", ".join(vuln.get("fix_versions") or []) or "no fix released"
            verdict.vulnerable.append(f"{name} {dep.get('version', '?')}: {vuln.get('id', '?')} (fixed in: {fixes})")
    skipped = {line.split(":", 1)[0] for line in verdict.unaudited}
    verdict.unaudited += [f"{name}: not in pip-audit's report" for name in sorted(set(pins) - seen - skipped)]
    if verdict.vulnerable:
        verdict.status = VULNERABLE
    elif verdict.unaudited or not verdict.audited:
        verdict.reason = failure or "the vulnerability database did not answer for every pin"
    else:
        verdict.status = CLEAN
    return verdict


def run_pip_audit(pip_audit: str, locks: list[Path], service: str, osv_url: str | None,
                  timeout_s: float) -> tuple[str | None, str]:
    """pip-audit's JSON report (None when it wrote none) and the last line of its stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [pip_audit, "--no-deps", "--disable-pip", "-f", "json", "-o", str(out), "--progress-spinner", "off",
               "-s", service, "--timeout", str(int(timeout_s))]
        if osv_url:
            cmd += ["--osv-url", osv_url]
        for lock in locks:
            cmd += ["-r", str(lock)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60.0, 20 * timeout_s))
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"pip-audit did not run: {exc}"
        tail = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), "")
        failure = f"pip-audit exited {proc.returncode}: {tail}" if proc.returncode not in (0, 1) or \
            not out.is_file() else ""
        return (out.read_text() if out.is_file() else None), failure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("locks", nargs="+", type=Path, help="lock files of exact pins")
    parser.add_argument("--pip-audit", default="pip-audit", help="the pip-audit executable")
    parser.add_argument("--service", choices=("pypi", "osv"), default="pypi")
    parser.add_argument("--osv-url", default=None, help="an OSV API mirror (with --service osv)")
    parser.add_argument("--timeout", type=float, default=15.0, help="socket timeout of each lookup, seconds")
    args = parser.parse_args(argv)
    pins: dict[str, str] = {}
    for lock in args.locks:
        try:
            pins.update(locked_pins(lock.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            print(f"audit: cannot read {lock}: {exc}", file=sys.stderr)
            return EXIT_CODES[UNKNOWN]
    report, failure = run_pip_audit(args.pip_audit, args.locks, args.service, args.osv_url, args.timeout)
    verdict = classify(report, pins, failure)
    print("\n".join(verdict.lines()), file=sys.stdout if verdict.status == CLEAN else sys.stderr)
    return verdict.exit_code


if __name__ == "__main__":
    sys.exit(main())
