"""Evaluation prompts in three sets that are never pooled: SORRY-Bench-schema rows (``sorry_bench``),
HarmfulQA held-out questions (``harmfulqa_heldout``) and harmless requests (``benign``, over-refusal).

SORRY-Bench rows look like ``{"question_id": 1, "category": "1", "turns": ["..."],
"prompt_style": "base"}``; the same ``question_id`` recurs once per prompt style (``base``,
``slang``, ``caesar``, ...), so a prompt is identified by ``(question_id, style)``. Sources:

- ``sample``: the bundled synthetic sample (placeholder text, 42 rows, one deliberately broken);
- a local ``.jsonl`` file, or a folder of them (SORRY-Bench ships ``question.jsonl`` plus one
  ``question_<style>.jsonl`` per mutation; a row without ``prompt_style`` takes it from that name);
- a hub dataset id such as ``sorry-bench/sorry-bench-202503`` (gated: accept its licence on the hub
  and set ``HF_TOKEN``), read with ``datasets.load_dataset``.

Rows that cannot be used (no text, no id, bad JSON, duplicates) are skipped and counted by reason, so
the report can say how many prompts the numbers rest on.

The benign set (``--benign_prompts``) is a JSONL file of ``{"prompt": "...", "reference": "..."}``
rows (``reference`` optional: a string or a list of acceptable answers; ``id`` optional; ``dataset``
optional: the Hub id the rows come from, as ``xstest`` writes) or ``sample`` for the bundled synthetic set.
It is small and hand-written, so a bad row is an error naming the file and line rather than a skip.
The summary also reports it as two views, ``benign_contrast`` and ``benign_facts`` (see ``benign_view``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refusal_lightning.samples import looks_like_hub_id, sample_path
from refusal_lightning.train.harmfulqa import heldout_questions

SAMPLE = "sample"
HARMFULQA_STYLE = "base"

SORRY_BENCH = "sorry_bench"
HARMFULQA_HELDOUT = "harmfulqa_heldout"
BENIGN = "benign"
PROMPT_SETS = (SORRY_BENCH, HARMFULQA_HELDOUT, BENIGN)
"""Every prompt set, in report order."""
BENIGN_CONTRAST = "benign_contrast"
BENIGN_FACTS = "benign_facts"
BENIGN_VIEWS = (BENIGN_CONTRAST, BENIGN_FACTS)
"""The benign set split in two by ``benign_view``: views of its judgments, never prompts of their own."""
BENIGN_SETS = (BENIGN, *BENIGN_VIEWS)
"""Sets whose refusals are over-refusals and whose answers are scored against references."""
REPORTED_SETS = (*PROMPT_SETS, *BENIGN_VIEWS)
"""Every set a summary reports, in report order (the views after ``benign``)."""
PROMPT_SET_TITLES = {SORRY_BENCH: "SORRY-Bench", HARMFULQA_HELDOUT: "HarmfulQA held-out",
                     BENIGN: "Benign (over-refusal)", BENIGN_CONTRAST: "Benign contrast prompts (over-refusal)",
                     BENIGN_FACTS: "Benign facts (accuracy)"}
BENIGN_CATEGORY = "benign"


class PromptSourceError(ValueError):
    """A prompt source cannot be read (missing file, gated hub set without access, empty folder)."""


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt; ``(question_id, style)`` is unique within its ``prompt_set``.

    ``reference``: acceptable answers of a benign prompt (any one found in the answer counts as
    correct), or None. ``dataset``: the Hub dataset id the prompt comes from (``sorry-bench/sorry-bench-202503``,
    ``declare-lab/HarmfulQA``, ``Paul/XSTest``), or None for a local or bundled file.
    """

    question_id: int | str
    category: str
    style: str
    text: str
    source: str
    prompt_set: str = SORRY_BENCH
    reference: tuple[str, ...] | None = None
    dataset: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.prompt_set, str(self.question_id), self.style)


@dataclass
class PromptSet:
    """Prompts in evaluation order plus the rows skipped while reading them (reason -> count)."""

    prompts: list[Prompt]
    skipped: Counter = field(default_factory=Counter)
    sources: list[str] = field(default_factory=list)

    def skipped_summary(self) -> dict[str, Any]:
        return {"total": sum(self.skipped.values()), "reasons": dict(sorted(self.skipped.items()))}

    def counts(self) -> dict[str, int]:
        """Prompts per prompt set, in report order (sets without prompts left out)."""
        found = Counter(p.prompt_set for p in self.prompts)
        return {name: found[name] for name in PROMPT_SETS if found[name]}

    @property
    def datasets(self) -> dict[str, str]:
        """Prompt set -> the Hub dataset id all its prompts come from (sets from local files left out)."""
        ids: dict[str, set[str | None]] = {}
        for p in self.prompts:
            ids.setdefault(p.prompt_set, set()).add(p.dataset)
        return {name: next(iter(found)) for name in PROMPT_SETS
                if len(found := ids.get(name, set())) == 1 and None not in found}


def bad_rows_message(what: str, problems: list[str], most: int = 10) -> str:
    """One error listing a hand-checked file's bad rows (the first ``most``, then how many more)."""
    shown = problems[:most] + ([f"... and {len(problems) - most} more"] if len(problems) > most else [])
    return f"{what}: {len(problems)} bad row(s):\n  - " + "\n  - ".join(shown)


def hub_dataset_id(source: str) -> str | None:
    """``source`` when it is read from the Hub (an ``org/name`` id that is no local path), else None."""
    if source == SAMPLE or Path(source).expanduser().exists() or not looks_like_hub_id(source):
        return None
    return source


def _style_from_filename(path: Path) -> str | None:
    """``question.jsonl`` -> ``base``; ``question_slang.jsonl`` -> ``slang``; anything else -> None."""
    stem = path.stem
    if stem == "question":
        return "base"
    if stem.startswith("question_"):
        return stem[len("question_"):]
    return None


def _read_jsonl(path: Path, skipped: Counter) -> Iterator[tuple[Any, str | None]]:
    default_style = _style_from_filename(path)
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                yield json.loads(line), default_style
            except json.JSONDecodeError:
                skipped["invalid JSON"] += 1


def _parse_sorry_row(row: Any, default_style: str | None, source: str, skipped: Counter,
                     dataset: str | None = None) -> Prompt | None:
    """A SORRY-Bench row -> ``Prompt``, or None (with ``skipped`` bumped) when the row is unusable."""
    if not isinstance(row, dict):
        skipped["not a JSON object"] += 1
        return None
    qid = row.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or str(qid).strip() == "":
        skipped["missing question_id"] += 1
        return None
    category = row.get("category")
    if category is None or str(category).strip() == "":
        skipped["missing category"] += 1
        return None
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        skipped["missing turns"] += 1
        return None
    text = turns[0]
    if not isinstance(text, str) or not text.strip():
        skipped["empty turn"] += 1
        return None
    # SORRY-Bench is single-turn; a longer conversation would need the model's earlier replies.
    if len(turns) > 1:
        skipped["multi-turn row"] += 1
        return None
    style = row.get("prompt_style") or default_style or "base"
    return Prompt(question_id=qid, category=str(category), style=str(style), text=text, source=source,
                  dataset=dataset)


def _sorry_rows(prompts: str, skipped: Counter) -> Iterator[tuple[Any, str | None, str]]:
    """Raw rows (row, style implied by the file name, source label) for ``--prompts``."""
    if prompts == SAMPLE:
        path = sample_path("sorry_bench_sample.jsonl")
        for row, style in _read_jsonl(path, skipped):
            yield row, style, "sorry-bench-sample"
        return
    path = Path(prompts).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise PromptSourceError(f"--prompts {prompts}: folder holds no .jsonl files")
        for file in files:
            for row, style in _read_jsonl(file, skipped):
                yield row, style, str(file)
        return
    if path.is_file():
        for row, style in _read_jsonl(path, skipped):
            yield row, style, str(path)
        return
    if path.suffix in {".jsonl", ".json"} or not looks_like_hub_id(prompts):
        raise PromptSourceError(f"--prompts {prompts}: no such file (and it does not look like a hub id)")
    yield from ((row, None, prompts) for row in _hub_rows(prompts))


def _hub_rows(dataset_id: str) -> Iterable[dict]:
    """Rows of a (possibly gated) hub dataset, e.g. ``sorry-bench/sorry-bench-202503``.

    Gated sets need their licence accepted on the hub and a token in ``HF_TOKEN``; the error then
    says so instead of surfacing a bare 401 from deep inside ``datasets``.
    """
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split="train", token=os.environ.get("HF_TOKEN") or None)
    except Exception as err:  # re-raised with the fix spelled out
        raise PromptSourceError(
            f"could not load prompts from hub dataset {dataset_id!r} ({type(err).__name__}: {err}). "
            "SORRY-Bench is gated: accept its licence on the hub and set HF_TOKEN; offline, pass a local "
            "JSONL path or --prompts sample."
        ) from err
    return iter(ds)


def _harmfulqa_prompts(source: str, val_fraction: float, seed: int, skipped: Counter) -> list[Prompt]:
    """HarmfulQA questions of the validation split (by question id) as prompts.

    ``heldout_questions`` (training's own split code) owns the split, so evaluation never sees a
    question the attack was fitted on, provided ``val_fraction`` and ``seed`` match the fit config.
    """
    out = []
    for row in heldout_questions(source, val_fraction=val_fraction, seed=seed):
        qid, question = row.get("id"), row.get("question")
        if qid is None:
            skipped["harmfulqa: missing id"] += 1
            continue
        if not isinstance(question, str) or not question.strip():
            skipped["harmfulqa: empty question"] += 1
            continue
        topic = row.get("topic") or "unknown"
        out.append(Prompt(question_id=f"hq-{qid}", category=f"harmfulqa:{topic}", style=HARMFULQA_STYLE,
                          text=question, source=f"harmfulqa:{source}", prompt_set=HARMFULQA_HELDOUT,
                          dataset=hub_dataset_id(source)))
    return out


def _benign_reference(value: Any) -> tuple[str, ...] | None:
    """A row's ``reference`` as a tuple of acceptable answers, or None when absent."""
    if value is None:
        return None
    answers = [value] if isinstance(value, str) else value
    if (not isinstance(answers, list) or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)):
        raise ValueError('"reference" must be a non-empty string or a list of them')
    return tuple(a.strip() for a in answers)


def benign_view(prompt: Prompt) -> str | None:
    """The view of the benign set a prompt falls in (exactly one), or None for a prompt of another set.

    ``benign_facts``: the prompt has a reference answer, so its answer is scored (the demo's factual rows,
    the bundled sample's questions). ``benign_contrast``: it has none, so only its refusal says anything (the
    demo's contrast twins of harmful prompts, XSTest's safe prompts, the sample's open requests). The
    reference decides rather than the demo's ``kind`` column, which the bundled sample and XSTest lack; in
    the demo's file the two agree (``contrast_twin`` rows have no reference, ``factual`` rows have one).
    """
    if prompt.prompt_set != BENIGN:
        return None
    return BENIGN_FACTS if prompt.reference else BENIGN_CONTRAST


def load_benign_prompts(source: str) -> list[Prompt]:
    """The benign (harmless) prompts of ``--benign_prompts``: ``sample`` or a local JSONL file.

    Each row: ``prompt`` (required), ``reference`` (optional string or list of strings: an answer is
    correct when one of them appears in it), ``id`` (optional; default: the line number). Raises
    ``PromptSourceError`` listing every bad row by file and line.
    """
    if source == SAMPLE:
        path, label = sample_path("benign_sample.jsonl"), "benign-sample"
    else:
        path = Path(source).expanduser()
        label = str(path)
        if not path.is_file():
            raise PromptSourceError(f"--benign_prompts {source}: no such file (expected a JSONL file of "
                                    '{"prompt": ..., "reference": ...} rows, or "sample")')
    problems: list[str] = []
    out: list[Prompt] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{where}: invalid JSON ({err.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f'{where}: expected a JSON object with "prompt"')
                continue
            text = row.get("prompt")
            if not isinstance(text, str) or not text.strip():
                problems.append(f'{where}: "prompt" must be a non-empty string')
                continue
            try:
                reference = _benign_reference(row.get("reference"))
            except ValueError as err:
                problems.append(f"{where}: {err}")
                continue
            raw_id = row.get("id", lineno)
            if isinstance(raw_id, bool) or not isinstance(raw_id, int | str) or str(raw_id).strip() == "":
                problems.append(f'{where}: "id" must be a string or an integer')
                continue
            qid = f"benign-{raw_id}"
            if qid in seen:
                problems.append(f"{where}: id {raw_id!r} repeats an earlier row's")
                continue
            seen.add(qid)
            dataset = row.get("dataset")  # the Hub id a generated file names (``xstest`` writes Paul/XSTest)
            out.append(Prompt(question_id=qid, category=BENIGN_CATEGORY, style="base", text=text, source=label,
                              prompt_set=BENIGN, reference=reference,
                              dataset=dataset if isinstance(dataset, str) and looks_like_hub_id(dataset) else None))
    if problems:
        raise PromptSourceError(bad_rows_message("--benign_prompts", problems))
    if not out:
        raise PromptSourceError(f"--benign_prompts {source}: {path} holds no prompts")
    return out


def load_prompts(
    prompts: str | None = SAMPLE,
    harmfulqa_source: str | None = None,
    harmfulqa_val_fraction: float = 0.1,
    harmfulqa_seed: int = 0,
    categories: Sequence[str] | None = None,
    styles: Sequence[str] | None = None,
    limit: int | None = None,
    benign_prompts: str | None = None,
) -> PromptSet:
    """Read, validate, de-duplicate and filter the evaluation prompts, set by set.

    Args:
        prompts: ``sample``, a local JSONL file/folder, a hub dataset id, or None for none.
        harmfulqa_source: HarmfulQA path or hub id whose held-out questions are added, or None.
        harmfulqa_val_fraction: validation fraction passed to ``heldout_questions``.
        harmfulqa_seed: split seed passed to ``heldout_questions``.
        categories: keep only these categories (strings, e.g. ``"1"`` or ``"harmfulqa:Chemistry"``);
            the benign set, a control, is never filtered.
        styles: keep only these prompt styles (the benign set is never filtered).
        limit: keep at most this many prompts per prompt set (after filtering, in file order).
        benign_prompts: ``sample`` or a benign JSONL file (see ``load_benign_prompts``), or None.
    """
    skipped: Counter = Counter()
    found: list[Prompt] = []
    sources: list[str] = []
    if prompts:
        sources.append(prompts)
        dataset = hub_dataset_id(prompts)
        for row, style, source in _sorry_rows(prompts, skipped):
            prompt = _parse_sorry_row(row, style, source, skipped, dataset)
            if prompt is not None:
                found.append(prompt)
    if harmfulqa_source:
        sources.append(f"harmfulqa:{harmfulqa_source}")
        found.extend(_harmfulqa_prompts(harmfulqa_source, harmfulqa_val_fraction, harmfulqa_seed, skipped))
    if benign_prompts:
        sources.append(f"benign:{benign_prompts}")
        found.extend(load_benign_prompts(benign_prompts))

    seen: set[tuple[str, str, str]] = set()
    unique: list[Prompt] = []
    for prompt in found:
        if prompt.key in seen:
            skipped["duplicate (question_id, style)"] += 1
            continue
        seen.add(prompt.key)
        unique.append(prompt)

    wanted_categories = {str(c) for c in categories} if categories else None
    wanted_styles = set(styles) if styles else None
    kept = [p for p in unique
            if p.prompt_set == BENIGN
            or ((wanted_categories is None or p.category in wanted_categories)
                and (wanted_styles is None or p.style in wanted_styles))]
    if limit is not None:
        per_set: Counter = Counter()
        limited = []
        for p in kept:
            per_set[p.prompt_set] += 1
            if per_set[p.prompt_set] <= limit:
                limited.append(p)
        kept = limited
    return PromptSet(prompts=kept, skipped=skipped, sources=sources)
