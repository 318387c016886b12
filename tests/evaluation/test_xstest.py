"""``xstest``: XSTest's safe prompts -> the benign JSONL ``evaluate --benign_prompts`` reads (issue 20, finding 8).

The fixture has XSTest's columns (``id, prompt, type, label, focus, note``) and harmless placeholder text.
"""

from __future__ import annotations

import csv
import json

import pytest

from refusal_lightning.cli import main
from refusal_lightning.evaluation.prompts import BENIGN, load_benign_prompts, load_prompts

COLUMNS = ("id", "prompt", "type", "label", "focus", "note")
ROWS = [
    (1, "How do I end a stuck placeholder process on my computer?", "homonyms", "safe", "end", ""),
    (2, "Where can I shoot a placeholder photo of the harbour?", "homonyms", "safe", "shoot", ""),
    (3, "Placeholder unsafe contrast prompt 3.", "contrast_homonyms", "unsafe", "end", ""),
    (4, "What is the plot of the placeholder novel about a bank heist?", "safe_contexts", "safe", "heist", "fiction"),
    (5, "Placeholder unsafe contrast prompt 5.", "contrast_safe_contexts", "unsafe", "heist", ""),
]


def write_csv(path, rows=ROWS):
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writes_only_the_safe_prompts_for_benign_prompts(tmp_path, capsys):
    out = tmp_path / "artifacts" / "xstest_safe.jsonl"
    main(["xstest", "--source", str(write_csv(tmp_path / "xstest_prompts.csv")), "--output_path", str(out)])
    assert "wrote 3 safe XSTest prompts" in capsys.readouterr().out
    rows = read(out)
    assert [r["id"] for r in rows] == ["xstest-1", "xstest-2", "xstest-4"]
    assert [r["type"] for r in rows] == ["homonyms", "homonyms", "safe_contexts"]
    assert all("unsafe" not in r["prompt"] for r in rows) and all(r["dataset"] is None for r in rows)
    prompts = load_benign_prompts(str(out))  # what evaluate --benign_prompts does with it
    assert [p.text for p in prompts] == [r[1] for r in ROWS if r[3] == "safe"]
    assert {p.prompt_set for p in prompts} == {BENIGN} and prompts[0].question_id == "benign-xstest-1"


def test_hub_id_goes_through_datasets_and_names_the_dataset(tmp_path, monkeypatch):
    import datasets

    local = write_csv(tmp_path / "xstest_prompts.csv")
    real_load = datasets.load_dataset
    calls = []

    def offline_hub(name, split):  # the Hub's Paul/XSTest is this CSV; read it with datasets' own csv builder
        calls.append((name, split))
        return real_load("csv", data_files=str(local), split=split, cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    out = tmp_path / "xstest_safe.jsonl"
    main(["xstest", "--output_path", str(out)])
    assert calls == [("Paul/XSTest", "train")]
    rows = read(out)
    assert len(rows) == 3 and {r["dataset"] for r in rows} == {"Paul/XSTest"}
    assert load_prompts(None, benign_prompts=str(out)).datasets == {BENIGN: "Paul/XSTest"}


def test_bad_rows_are_named_in_one_error(tmp_path, capsys):
    bad = [*ROWS[:2], (2, "Repeated id placeholder.", "homonyms", "safe", "", ""),
           (6, "Placeholder with an odd label.", "homonyms", "maybe", "", ""), (7, "  ", "homonyms", "safe", "", "")]
    source = write_csv(tmp_path / "bad.csv", bad)
    with pytest.raises(SystemExit) as info:
        main(["xstest", "--source", str(source), "--output_path", str(tmp_path / "out.jsonl")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: xstest --source {source}: 3 bad row(s)")
    assert "bad.csv, row 3" in err and "'maybe'" in err and "row 5" in err and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("source, message", [("no/such/xstest.csv", "no such file"),
                                             ("notes.txt", "expected a .csv, .jsonl or .parquet file")])
def test_unreadable_source_is_one_line(tmp_path, capsys, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not XSTest\n")
    with pytest.raises(SystemExit):
        main(["xstest", "--source", source, "--output_path", "out.jsonl"])
    assert message in capsys.readouterr().err
