"""ldm.files.replace_directory, the one directory swap: its files are fsynced before the rename and the parent after
it, and a failure at any point leaves the old directory or the new one, never neither (the generated shapes dataset
is swapped with it too)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ldm import files
from ldm.demo.shapes import write_dataset
from ldm.files import OLD_PREFIX, replace_directory


def make(path: Path, content: str) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "a.txt").write_text(content)
    (path / "sub" / "b.txt").write_text(content)
    return path


def content(path: Path) -> str:
    return (path / "a.txt").read_text() + "/" + (path / "sub" / "b.txt").read_text()


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, str]]:
    """("fsync", path) and ("rename", source) in the order they happen."""
    seen: list[tuple[str, str]] = []
    real_file, real_dir, real_rename = files.fsync_file, files.fsync_dir, os.rename
    monkeypatch.setattr(files, "fsync_file", lambda p: seen.append(("fsync", str(p))) or real_file(p))
    monkeypatch.setattr(files, "fsync_dir", lambda p: seen.append(("fsync", str(p))) or real_dir(p))
    monkeypatch.setattr(os, "rename", lambda a, b: seen.append(("rename", str(a))) or real_rename(a, b))
    return seen


def test_the_new_directory_is_fsynced_then_renamed_then_its_parent_fsynced(tmp_path, events):
    final = make(tmp_path / "out", "old")
    tmp = make(tmp_path / ".tmp-out", "new")
    replace_directory(tmp, final)
    assert content(final) == "new/new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    swap = next(i for i in renames if events[i][1] == str(tmp))
    fsynced_before = {path for kind, path in events[:swap] if kind == "fsync"}
    assert {str(tmp / "a.txt"), str(tmp / "sub" / "b.txt"), str(tmp / "sub"), str(tmp)} <= fsynced_before
    assert ("fsync", str(tmp_path)) in events[swap + 1:]  # the rename itself is durable


@pytest.mark.parametrize("interruption", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_rename_leaves_the_old_directory(tmp_path, monkeypatch, interruption):
    final = make(tmp_path / "out", "old")
    tmp = make(tmp_path / ".tmp-out", "new")
    real_rename = os.rename

    def rename(source, target):
        if Path(source) == tmp:
            raise interruption
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(type(interruption)):
        replace_directory(tmp, final)
    assert content(final) == "old/old" and not (tmp_path / f"{OLD_PREFIX}out").exists()
    assert content(tmp) == "new/new"  # the caller's to remove or retry


def test_a_failure_after_the_rename_leaves_the_new_directory(tmp_path, monkeypatch):
    final = make(tmp_path / "out", "old")
    tmp = make(tmp_path / ".tmp-out", "new")
    real_fsync_dir = files.fsync_dir

    def fsync_dir(path):
        if Path(path) == tmp_path:
            raise OSError(5, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(files, "fsync_dir", fsync_dir)
    with pytest.raises(OSError):
        replace_directory(tmp, final)
    assert content(final) == "new/new"
    assert content(tmp_path / f"{OLD_PREFIX}out") == "old/old"  # not yet deleted: the old one is never lost first


def test_a_death_between_the_two_renames_keeps_the_old_directory_aside(tmp_path, monkeypatch):
    final = make(tmp_path / "out", "old")
    tmp = make(tmp_path / ".tmp-out", "new")
    real_rename = os.rename

    def rename(source, target):
        if Path(source) == tmp or Path(source).name.startswith(OLD_PREFIX):
            raise OSError(5, "Input/output error")  # the swap fails and so does putting the old one back
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        replace_directory(tmp, final)
    assert not final.exists() and content(tmp_path / f"{OLD_PREFIX}out") == "old/old"


# --------------------------------------------------------------------------------------- the shapes dataset

def test_the_shapes_dataset_is_fsynced_before_it_appears(tmp_path, events):
    out = write_dataset(tmp_path / "data", num_images=3, size=16)
    swap = next(i for i, (kind, path) in enumerate(events) if kind == "rename" and Path(path).parent == tmp_path
                and Path(path).name.startswith(files.TMP_PREFIX))
    fsynced = {Path(path).name for kind, path in events[:swap] if kind == "fsync"}
    assert {"00000.png", "00001.png", "00002.png", "metadata.jsonl"} <= fsynced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and len(list(out.glob("*.png"))) == 3


def test_a_failed_swap_keeps_the_previous_shapes_dataset(tmp_path, monkeypatch):
    out = write_dataset(tmp_path / "data", num_images=2, size=16)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = os.rename

    def rename(source, target):
        if Path(source).name.startswith(files.TMP_PREFIX):
            raise OSError(28, "No space left on device")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        write_dataset(tmp_path / "data", num_images=3, size=16, seed=1, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary and no `.old-` left
