"""Run the test suite against the newest releases the registry serves; print what changed and what failed.

    python tools/upgrade_check.py [--resolve-only] [--venv DIR] [--hold torch,torchvision] [--write] [-- PYTEST ARGS]

`constraints.txt` pins the set of versions that CI and the README's commands install. Upgrading it is a deliberate
step, and this script is that step:

1. In a fresh virtual environment (`--venv DIR`, default a temporary one, removed afterwards), install
   `-e .[test]` WITHOUT the constraints, so the resolver picks the newest releases, except the `--hold` packages
   (default torch and torchvision, kept at their pinned versions: they are the large CUDA builds that the README's
   commands name explicitly).
2. Print every package whose version differs from the pinned set (and those added or dropped).
3. Run the whole suite there (`python -m pytest -q -rf`, plus PYTEST ARGS) and print each failed test with the
   first line of its error.
4. With `--write`, and only when the suite passed, rewrite `constraints.txt` with the new set.

`--resolve-only` does step 1 as a dry run of the resolver (about a minute, no venv) and stops after step 2.
Exit code: 0 when the suite passed (or with --resolve-only), 1 when tests failed, 2 when the install failed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
HEADER = """\
# The tested set of versions: what `.ci/run` and the README's commands install (`pip install ... -c constraints.txt`).
# Resolved on {day} for Python {python} on {platform}, and run green by the whole test suite.
# `pyproject.toml` keeps honest lower bounds for installing ldm into an existing environment.
# To move to newer releases deliberately: `python tools/upgrade_check.py` (see its docstring).
"""


def normalize(name: str) -> str:
    """PEP 503 name normalisation: 'Open_CLIP.torch' and 'open-clip-torch' are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a constraints file, keyed by normalised name (comments and blanks ignored)."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected 'name==version', got {line!r}")
        pins[normalize(match[1])] = match[2]
    return pins


def diff_pins(old: dict[str, str], new: dict[str, str]) -> list[tuple[str, str, str]]:
    """(package, pinned, newest) for each package whose version differs; '-' marks one that is absent."""
    return [(name, old.get(name, "-"), new.get(name, "-"))
            for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]


def format_diff(rows: list[tuple[str, str, str]]) -> str:
    if not rows:
        return "no version differs from constraints.txt"
    width = max(len(r[0]) for r in rows)
    lines = [f"{'package':<{width}}  {'pinned':<16}  newest", f"{'-' * width}  {'-' * 16}  {'-' * 16}"]
    lines += [f"{name:<{width}}  {old:<16}  {new}" for name, old, new in rows]
    return "\n".join(lines)


def write_pins(path: Path, pins: dict[str, str], names: dict[str, str]) -> None:
    header = HEADER.format(day=date.today().isoformat(), python=".".join(map(str, sys.version_info[:2])),
                           platform=f"{sys.platform} {__import__('platform').machine()}")
    body = "".join(f"{names.get(n, n)}=={v}\n" for n, v in sorted(pins.items()))
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(header + body)
    tmp.replace(path)


def failures_from_junit(report: Path) -> list[str]:
    """'test id: first line of the error' for every failed or erroring test case of a JUnit XML report."""
    out = []
    for case in ET.parse(report).getroot().iter("testcase"):
        for kind in ("failure", "error"):
            element = case.find(kind)
            if element is not None:
                message = (element.get("message") or element.text or kind).strip().splitlines() or [kind]
                out.append(f"{case.get('classname', '')}::{case.get('name', '')}: {message[0][:200]}")
    return out


def resolve(python: str, held: dict[str, str], *, dry_run: bool) -> tuple[dict[str, str], dict[str, str]]:
    """Install (or, with `dry_run`, only resolve) `-e .[test]` with the newest releases; returns (pins, names)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--quiet", "--report", str(report)]
        cmd += ["--dry-run", "--ignore-installed"] if dry_run else []
        cmd += [f"{name}=={version}" for name, version in held.items()] + ["-e", f"{ROOT}[test]"]
        result = subprocess.run(cmd, cwd=ROOT)
        if result.returncode != 0:
            raise SystemExit(2)
        installed = json.loads(report.read_text())["install"]
    pins, names = {}, {}
    for item in installed:
        name = item["metadata"]["name"]
        if normalize(name) != "ldm":
            pins[normalize(name)] = item["metadata"]["version"]
            names[normalize(name)] = name
    return pins, names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolve-only", action="store_true", help="resolve and print the differences; no tests")
    parser.add_argument("--venv", type=Path, help="virtual environment to create and keep (default: temporary)")
    parser.add_argument("--hold", default="torch,torchvision", help="packages kept at their pinned versions")
    parser.add_argument("--write", action="store_true", help="rewrite constraints.txt when the suite passes")
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    args = parser.parse_args(argv)

    pinned = read_pins(CONSTRAINTS)
    held = {normalize(n): pinned[normalize(n)] for n in args.hold.split(",") if normalize(n) in pinned}
    if args.resolve_only:
        newest, _ = resolve(sys.executable, held, dry_run=True)
        print(format_diff(diff_pins(pinned, newest)))
        return 0

    venv = args.venv or Path(tempfile.mkdtemp(prefix="ldm-upgrade-"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = str(venv / "bin" / "python")
        newest, names = resolve(python, held, dry_run=False)
        print(format_diff(diff_pins(pinned, newest)), flush=True)
        junit = venv / "junit.xml"
        cmd = [python, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", f"--junitxml={junit}", *args.pytest_args]
        passed = subprocess.run(cmd, cwd=ROOT).returncode == 0
        failed = failures_from_junit(junit) if junit.exists() else []
        print(f"\nnewest versions: {'suite passed' if passed else f'{len(failed)} test(s) failed'}")
        for line in failed:
            print(f"  FAILED {line}")
        if passed and args.write:
            write_pins(CONSTRAINTS, newest, names)
            print(f"wrote {CONSTRAINTS.relative_to(ROOT)} ({len(newest)} pins)")
        return 0 if passed else 1
    finally:
        if args.venv is None:
            shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
