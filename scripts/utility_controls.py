"""The controls beside a finished utility grid's numbers (``python -m refusal_lightning utility``), read from its
folder without rerunning anything:

    python scripts/utility_controls.py artifacts/demo/utility

- **A model that answers one label**: the held-out accuracy of always answering each label of the task (the
  rows the grid asked), so that a fine-tune which learned the answer format but not the task is seen for what
  it is; and, per unit, whether its task answers were one label throughout.
- **Label collapse on the harmful set**: the share of harmful-set (SORRY-proxy) answers whose first word is a
  task label, per unit. A fine-tune that answers every prompt "positive" would count as not refusing, so its
  harmful score would be high without any harmful compliance.

Writes ``<run_dir>/controls.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from refusal_lightning.evaluation.task_accuracy import first_word  # noqa: E402
from refusal_lightning.files import atomic_write_text  # noqa: E402
from refusal_lightning.train.task_data import TaskData, load_task_rows  # noqa: E402


def constant_answers(rows: list[dict]) -> dict[str, float]:
    """Accuracy of answering every row with the same label, per label (label tasks only)."""
    labels = Counter(first_word(r["answer"]) for r in rows)
    return {label: count / len(rows) for label, count in sorted(labels.items())}


def unit_controls(folder: Path, labels: set[str]) -> dict:
    """Per model of a unit: the share of its harmful-set answers that are a bare task label, and the task
    answers' distinct first words."""
    out: dict[str, dict] = {}
    responses = folder / "eval_last" / "responses.jsonl"
    if not responses.exists():  # the grid's first version kept its answers in eval/ and task/
        responses = folder / "eval" / "responses.jsonl"
    for line in responses.read_text().splitlines():
        row = json.loads(line)
        if row.get("prompt_set") != "sorry_bench":
            continue
        entry = out.setdefault(row["endpoint"], {"harmful_answers": 0, "label_answers": 0})
        entry["harmful_answers"] += 1
        entry["label_answers"] += first_word(row.get("response") or "") in labels
    task = next((p for p in (folder / "eval_last/task/task_answers.jsonl", folder / "task/task_answers.jsonl")
                 if p.exists()), None)
    if task is not None:
        for line in task.read_text().splitlines():
            row = json.loads(line)
            words = out.setdefault(row["model"], {}).setdefault("task_first_words", Counter())
            words[first_word(row.get("answer") or "")] += 1
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    record = json.loads((args.run_dir / "results.json").read_text())["utility"]
    settings = record["settings"]
    rows = load_task_rows(TaskData(**settings["heldout"]))[:settings["heldout_limit"]]
    constant = constant_answers(rows)
    labels = set(constant) if len(constant) <= 10 else set()  # a label task; GSM8K's answers are not labels
    units = {}
    for folder in sorted((args.run_dir / "units").iterdir()):
        if (folder / "cells.json").exists():
            units[folder.name] = unit_controls(folder, labels)
    result = {"constant_answer_accuracy": constant, "units": units}
    atomic_write_text(args.run_dir / "controls.json", json.dumps(result, indent=2, default=dict) + "\n")
    print("always answering one label:", ", ".join(f"{k} {100 * v:.1f}%" for k, v in constant.items()))
    print("| unit | model | harmful-set answers that are a task label | task answers: first words |")
    print("|---|---|---:|---|")
    for name, models in units.items():
        for model, entry in models.items():
            words = ", ".join(f"{w} {n}" for w, n in Counter(entry.get("task_first_words", {})).most_common(3))
            share = f"{entry.get('label_answers', 0)} of {entry.get('harmful_answers', 0)}"
            print(f"| {name} | {model} | {share} | {words} |")


if __name__ == "__main__":
    main()
