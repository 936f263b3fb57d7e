"""The pinned set of versions: complete, installed as pinned, and the upgrade script's reading and reporting."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import upgrade_check  # noqa: E402
from upgrade_check import diff_pins, failures_from_junit, format_diff, normalize, read_pins  # noqa: E402

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DIRECT = sorted({normalize(re.match(r"[A-Za-z0-9._-]+", spec)[0])
                 for spec in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]})


def test_every_dependency_is_pinned_and_installed_at_its_pin():
    pins = read_pins(ROOT / "constraints.txt")
    assert not [name for name in DIRECT if name not in pins], "add these to constraints.txt"
    # the README's commands install with `-c constraints.txt`: what runs here is what CI tested
    wrong = {name: (importlib.metadata.version(name), pins[name]) for name in DIRECT
             if importlib.metadata.version(name) != pins[name]}
    assert not wrong, f"installed != pinned (install with -c constraints.txt): {wrong}"


def test_pins_are_read_with_normalised_names_and_bad_lines_named(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("# header\nOpen_CLIP.torch==3.3.0  # why\n\ntorch==2.14.1\n")
    assert read_pins(path) == {"open-clip-torch": "3.3.0", "torch": "2.14.1"}
    path.write_text("torch>=2\n")
    with pytest.raises(ValueError, match=r"c.txt:1: expected 'name==version', got 'torch>=2'"):
        read_pins(path)


def test_the_diff_lists_changed_added_and_dropped_packages_only():
    old = {"torch": "2.14.1", "diffusers": "0.42.1", "gone": "1.0"}
    new = {"torch": "2.14.1", "diffusers": "0.43.0", "fresh": "0.1"}
    rows = diff_pins(old, new)
    assert rows == [("diffusers", "0.42.1", "0.43.0"), ("fresh", "-", "0.1"), ("gone", "1.0", "-")]
    table = format_diff(rows).splitlines()
    assert table[0].split() == ["package", "pinned", "newest"] and len(table) == 5
    assert format_diff([]) == "no version differs from constraints.txt"


def test_failures_are_read_from_the_junit_report(tmp_path):
    report = tmp_path / "j.xml"
    report.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="AssertionError: (0.67, 0.26)&#10;more">'
        'trace</failure></testcase><testcase classname="tests.test_b" name="test_err"><error message="">boom</error>'
        "</testcase></testsuite></testsuites>")
    assert failures_from_junit(report) == ["tests.test_a::test_bad: AssertionError: (0.67, 0.26)",
                                           "tests.test_b::test_err: boom"]


def test_writing_pins_round_trips(tmp_path):
    path = tmp_path / "constraints.txt"
    upgrade_check.write_pins(path, {"torch": "2.14.1", "open-clip-torch": "3.3.0"}, {"open-clip-torch": "open_clip_torch"})
    assert read_pins(path) == {"torch": "2.14.1", "open-clip-torch": "3.3.0"}
    assert "open_clip_torch==3.3.0" in path.read_text() and not list(tmp_path.glob(".tmp-*"))
