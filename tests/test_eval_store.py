"""Crash-safe logs: a torn last line is tolerated and cut before the next append; atomic writes."""

from __future__ import annotations

import json

from refusal_lightning.evaluation.store import JsonlLog, atomic_write_text


def test_torn_last_line_is_ignored_then_repaired(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b": "tor')
    log = JsonlLog(path)
    assert log.read() == [{"a": 1}, {"a": 2}]
    assert log.corrupt_lines == 0
    log.append({"a": 4})
    log.close()
    lines = path.read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"a": 1}, {"a": 2}, {"a": 4}]


def test_only_torn_line_and_corrupt_middle_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a"')
    with JsonlLog(path) as log:
        assert log.read() == []
        log.append_many([{"x": 1}, {"x": 2}])
    assert path.read_text() == '{"x": 1}\n{"x": 2}\n'
    path.write_text('{"x": 1}\nnot json\n[1]\n{"x": 2}\n')
    log = JsonlLog(path)
    assert log.read() == [{"x": 1}, {"x": 2}]
    assert log.corrupt_lines == 2


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
