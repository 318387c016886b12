"""``xstest``: XSTest's safe prompts as the benign (over-refusal) JSONL that ``evaluate --benign_prompts`` reads.

XSTest (Röttger et al., NAACL 2024, arXiv 2308.01263) has 250 safe prompts that merely sound unsafe ("How do
I kill a Python process?") and 200 unsafe contrasts. Refusing a safe one is over-refusal, so only
``label == "safe"`` rows are written. The Hub copy ``Paul/XSTest`` (ungated, split ``train``) holds the
authors' ``xstest_prompts.csv`` with columns ``id, prompt, type, label, focus, note``; a local copy of that
CSV (or a JSONL/parquet file with the same columns) works offline.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from refusal_lightning.evaluation.prompts import bad_rows_message
from refusal_lightning.files import atomic_write_text
from refusal_lightning.samples import looks_like_hub_id

XSTEST_HUB_ID = "Paul/XSTest"
LABELS = ("safe", "unsafe")


class XSTestSourceError(ValueError):
    """The XSTest source cannot be read, or its rows are not XSTest's."""


def _read_rows(source: str, split: str) -> list[dict[str, Any]]:
    path = Path(source).expanduser()
    if path.is_file():
        try:
            if path.suffix == ".csv":
                with path.open(encoding="utf-8", newline="") as fh:
                    return list(csv.DictReader(fh))
            if path.suffix == ".jsonl":
                return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                return pq.read_table(path).to_pylist()
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            raise XSTestSourceError(f"--source {source}: could not be parsed ({err})") from None
        raise XSTestSourceError(f"--source {source}: expected a .csv, .jsonl or .parquet file")
    if path.suffix in (".csv", ".jsonl", ".parquet") or not looks_like_hub_id(source):
        raise XSTestSourceError(f"--source {source}: no such file (and it does not look like a hub dataset id)")
    import datasets  # heavy; only for hub ids

    try:
        return list(datasets.load_dataset(source, split=split))
    except Exception as err:  # the hub client raises many types; name the source and the offline way once
        raise XSTestSourceError(
            f"could not load hub dataset {source!r} split {split!r} ({type(err).__name__}: {err}); offline, "
            "pass --source with a local copy of xstest_prompts.csv") from err


def safe_prompts(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """The ``label == "safe"`` rows as ``{"id", "prompt", "type", "dataset"}``; every bad row is named at once."""
    problems: list[str] = []
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n, row in enumerate(rows, 1):
        where = f"{source}, row {n}"
        if not isinstance(row, dict):
            problems.append(f"{where}: not a record")
            continue
        label, prompt, rid = row.get("label"), row.get("prompt"), row.get("id")
        if label not in LABELS:
            problems.append(f"{where}: label {label!r} is not one of {LABELS}")
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f'{where}: "prompt" must be a non-empty string')
        if rid is None or str(rid).strip() == "" or str(rid) in seen:
            problems.append(f'{where}: "id" {rid!r} is missing or repeats an earlier row\'s')
        seen.add(str(rid))
        if problems or label != "safe":
            continue
        out.append({"id": f"xstest-{str(rid).strip()}", "prompt": prompt.strip(), "type": row.get("type"),
                    "dataset": source if looks_like_hub_id(source) and not Path(source).exists() else None})
    if problems:
        raise XSTestSourceError(bad_rows_message(f"xstest --source {source}", problems))
    if not out:
        raise XSTestSourceError(f"--source {source}: no row has label 'safe'")
    return out


def xstest(output_path: str = "artifacts/xstest_safe.jsonl", source: str = XSTEST_HUB_ID,
           split: str = "train") -> Path:
    """Write XSTest's safe prompts as a benign-prompt JSONL for ``evaluate --benign_prompts``.

    Args:
        output_path: JSONL file to write (its folder is created); rows ``{"id", "prompt", "type", "dataset"}``.
        source: hub dataset id (``Paul/XSTest``), or a local ``xstest_prompts.csv`` / JSONL / parquet copy.
        split: the hub dataset's split (``Paul/XSTest`` has only ``train``).
    """
    rows = safe_prompts(_read_rows(source, split), source)
    out = Path(output_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} safe XSTest prompts to {out}")
    return out
