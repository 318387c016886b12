"""Crash-safe writes: atomic files (fsync, rename, fsync of the folder) and folder replacement."""

from __future__ import annotations

import os

import pytest

from refusal_lightning.files import atomic_write_text, move_files_into, replace_dir


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "out" / "summary.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["summary.json"]
    assert target.stat().st_mode & 0o044  # readable like any other output, not mkstemp's 0600


def test_atomic_write_fsyncs_file_then_folder_after_rename(tmp_path, monkeypatch):
    import os

    target = tmp_path / "summary.json"
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(target, "x")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].endswith(".tmp") and events[1][1] == str(target)
    assert events[2][1] == str(tmp_path)  # the folder, after the rename: the new name is durable


def test_replace_dir_and_move_files_into_leave_only_the_new_files(tmp_path):
    old, new = tmp_path / "out", tmp_path / "staging"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "stale.txt").write_text("old")
    (old / "keep.txt").write_text("kept")
    (new / "sub").mkdir(parents=True)
    (new / "sub" / "fresh.txt").write_text("new")
    (new / "a.txt").write_text("a")
    move_files_into(new, old)
    assert sorted(p.name for p in old.iterdir()) == ["a.txt", "keep.txt", "sub"]
    assert [p.name for p in (old / "sub").iterdir()] == ["fresh.txt"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.txt").write_text("b")
    replace_dir(other, old)
    assert [p.name for p in old.iterdir()] == ["b.txt"] and not other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "staging"]


def test_replace_dir_keeps_the_old_folder_when_the_swap_fails(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "weights.txt").write_text("old")
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / "never-written", dst)
    assert (dst / "weights.txt").read_text() == "old"
    # a swap that stopped between its two renames left only the old folder, aside: it comes back
    os.replace(dst, tmp_path / ".out.old")
    with pytest.raises(FileNotFoundError):
        replace_dir(tmp_path / "never-written", dst)
    assert (dst / "weights.txt").read_text() == "old" and not (tmp_path / ".out.old").exists()


def test_tree_sha256_changes_with_a_file_and_ignores_other_patterns(tmp_path):
    from refusal_lightning.checksums import tree_sha256

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    first = tree_sha256(tmp_path)
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    assert tree_sha256(tmp_path) == first
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert tree_sha256(tmp_path) != first
    (tmp_path / "pkg" / "a.py").rename(tmp_path / "pkg" / "b.py")  # same content, another module
    assert tree_sha256(tmp_path) not in (first, tree_sha256(tmp_path / "pkg"))
