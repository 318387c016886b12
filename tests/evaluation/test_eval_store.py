"""Crash-safe logs: a torn last line is tolerated and cut before the next append."""

from __future__ import annotations

import json

from refusal_lightning.evaluation.store import JsonlLog


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
