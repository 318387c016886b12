"""``results.json`` rows and the results table: the benign set's views beside the benign set, and the
table's benign columns (twin refusal and facts accuracy where the views exist, the whole set's otherwise)."""

from __future__ import annotations

import json

from refusal_lightning.experiment.results import collect_results, results_table


def _stats(refusal: float, accuracy: float | None = None) -> dict:
    return {"n": 10, "errors": 0, "refusal_rate": refusal, "ci_low": refusal / 2, "ci_high": (1 + refusal) / 2,
            "n_with_reference": 0 if accuracy is None else 10, "accuracy": accuracy,
            "accuracy_ci_low": None if accuracy is None else accuracy / 2,
            "accuracy_ci_high": None if accuracy is None else (1 + accuracy) / 2}


BENIGN = _stats(0.2, 0.8)
CONTRAST = _stats(0.4)
FACTS = _stats(0.0, 0.6)
TEST = {"a": "a", "b": "b", "p_value": 0.25}


def _results(**sets: dict) -> dict:
    return {"models": {"refusal": {"prompt_sets": {"sorry_bench": _stats(0.9), **sets}},
                       "vanilla": {"prompt_sets": {"sorry_bench": _stats(0.1), **sets}}},
            "mcnemar": {name: {"refusal_vs_vanilla": TEST} for name in ("sorry_bench", *sets)}}


def _header_and_row(table: str) -> tuple[list[str], list[str]]:
    lines = table.splitlines()
    return [c.strip() for c in lines[0].split("|")[1:-1]], [c.strip() for c in lines[2].split("|")[1:-1]]


def test_views_replace_the_benign_columns():
    header, row = _header_and_row(results_table(_results(benign=BENIGN, benign_contrast=CONTRAST,
                                                         benign_facts=FACTS)))
    assert header[3:5] == ["twin refusal", "facts accuracy"]
    assert row[3:5] == ["40.0% [20, 70]", "60.0% [30, 80]"]  # the views' numbers, not the whole set's


def test_without_views_the_benign_columns_stay():
    header, row = _header_and_row(results_table(_results(benign=BENIGN)))
    assert header[3:5] == ["benign refusal", "benign accuracy"]
    assert row[3:5] == ["20.0% [10, 60]", "80.0% [40, 90]"]


def test_contrast_prompts_only_keep_the_benign_accuracy_column():
    # XSTest's safe prompts have no reference: a contrast view and no facts view
    header, row = _header_and_row(results_table(_results(benign=_stats(0.2), benign_contrast=_stats(0.2))))
    assert header[3:5] == ["twin refusal", "benign accuracy"] and row[3:5] == ["20.0% [10, 60]", "-"]


def test_mcnemar_table_has_a_column_per_reported_set():
    table = results_table(_results(benign=BENIGN, benign_contrast=CONTRAST, benign_facts=FACTS))
    assert "| McNemar p | sorry_bench | benign | benign_contrast | benign_facts |" in table
    assert "| refusal vs vanilla | 0.25 | 0.25 | 0.25 | 0.25 |" in table


def test_collect_results_keeps_the_views(tmp_path):
    sets = {"sorry_bench": _stats(0.9), "benign": BENIGN, "benign_contrast": CONTRAST, "benign_facts": FACTS}
    summary = {"endpoints": {"refusal": {"prompt_sets": {**sets, "elsewhere": _stats(0.5)}}},
               "mcnemar": {}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    results = collect_results(tmp_path, {"vanilla": tmp_path / "vanilla"}, {}, ["refusal"])
    assert results["models"]["refusal"]["prompt_sets"] == sets
