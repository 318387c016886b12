"""The retain term's settings and prompts: benign requests on which the refusal fit keeps the base model's
behaviour (no torch here).

Refusal training on safe replies also moves the model on harmless inputs: on SmolLM2 it refused benign
twins of the harmful prompts and recalled wrong facts. Published refusal-training recipes add a retain
loss on benign data beside the refusal loss (e.g. circuit breakers, Zou et al. 2024, arXiv 2406.04313,
section 3: a retain set whose representations stay close to the original model's). Here the retain set is
a list of benign prompts; the base model answers each once (``retain_answers.py``) and the loss
(``retain_loss.py``) keeps the adapted model's distribution on those answers close to the base's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from refusal_lightning.samples import looks_like_hub_id

RetainKind = Literal["kl", "distill"]
RETAIN_KINDS: tuple[str, ...] = ("kl", "distill")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class RetainConfigError(ValueError):
    """The retain section cannot work (every problem in one message)."""


class RetainSourceError(ValueError):
    """The retain prompts could not be read, or none are left after the exclusions."""


@dataclass
class RetainConfig:
    """Retain term: keep the base model's behaviour on benign prompts while the LoRA trains (refusal fit)."""

    enabled: bool = False
    """Add ``weight * retain_loss`` to the training loss (logged as ``retain/loss``; ``train/loss`` stays the
    task loss). Off: the fit is exactly the one without this section."""
    kind: RetainKind = "kl"
    """``kl``: KL(base || adapted) of the next-token distribution at every token of the base model's own
    answers, the base computed with the adapter disabled in the same step (one extra forward without
    gradient). ``distill``: cross-entropy on the base model's greedy answers (no extra forward; only the
    argmax token of each position is kept)."""
    weight: float = 1.0
    """Weight of the retain loss against the task loss (per micro-batch, like the task loss)."""
    source: str | None = None
    """Retain prompts: a local JSONL/JSON/parquet/CSV file or a Hub dataset id, read with ``datasets``."""
    prompt_field: str = "prompt"
    """Column holding the prompt text (rows where it is empty are skipped)."""
    split: str = "train"
    """Dataset split to read (a local file has only ``train``)."""
    exclude: list[str] = field(default_factory=list)
    """Prompt files (JSONL: ``prompt``, SORRY-Bench ``turns`` or ``question`` per row) whose prompts are never
    used: the evaluated sets. Compared after lowercasing and collapsing whitespace."""
    max_prompts: int | None = None
    """Use only the first N prompts left after the exclusions (None: all)."""
    batch_size: int = 8
    """Retain rows per training micro-batch, drawn at random (seeded by ``seed`` and the step)."""
    max_new_tokens: int = 32
    """Length of the base model's greedy answers (generated once at fit start, cached beside the adapter)."""
    seed: int = 0
    """Seed of the retain batches."""


def check_retain_config(cfg: RetainConfig, merge_adapters: list[str] | None = None) -> None:
    """Raise ``RetainConfigError`` naming every problem of an enabled retain section at once (before the model
    loads)."""
    if not cfg.enabled:
        return
    problems = []
    if cfg.kind not in RETAIN_KINDS:
        problems.append(f"retain.kind must be one of {', '.join(RETAIN_KINDS)}, got {cfg.kind!r}")
    if not cfg.weight >= 0:  # also catches NaN
        problems.append(f"retain.weight must be >= 0, got {cfg.weight}")
    if cfg.source is None:
        problems.append("retain.enabled is true but retain.source is not set (a JSONL of benign prompts or a Hub "
                        "dataset id)")
    elif not Path(cfg.source).expanduser().exists() and not looks_like_hub_id(cfg.source):
        problems.append(f"retain.source '{cfg.source}' is neither an existing file nor a Hub dataset id")
    elif Path(cfg.source).expanduser().is_file() and Path(cfg.source).suffix not in LOCAL_FORMATS:
        problems.append(f"retain.source '{cfg.source}': unknown file type (use {', '.join(LOCAL_FORMATS)})")
    missing = [p for p in cfg.exclude if not Path(p).expanduser().is_file()]
    if missing:
        problems.append(f"retain.exclude files not found: {', '.join(missing)}")
    for name in ("batch_size", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            problems.append(f"retain.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_prompts is not None and cfg.max_prompts < 1:
        problems.append(f"retain.max_prompts must be >= 1 or null, got {cfg.max_prompts}")
    if merge_adapters:
        problems.append("retain needs the plain base as its reference, but model.merge_adapters is set (an attack "
                        "fit); the retain term is for the refusal fit")
    if problems:
        raise RetainConfigError(f"retain settings, {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


def normalise(prompt: str) -> str:
    """The form prompts are compared in: lowercase, whitespace collapsed."""
    return " ".join(prompt.split()).lower()


def prompt_file_texts(path: str | Path) -> list[str]:
    """Prompts of a JSONL prompt file: ``prompt`` (benign sets), ``turns[0]`` (SORRY-Bench) or ``question``."""
    texts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        text = row.get("prompt") or (row.get("turns") or [None])[0] or row.get("question")
        if text:
            texts.append(str(text))
    return texts


def _read_rows(cfg: RetainConfig) -> list[dict]:
    import datasets  # heavy; only when the retain term is on

    assert cfg.source is not None
    path = Path(cfg.source).expanduser()
    try:
        if path.is_file():
            return list(datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train"))
        return list(datasets.load_dataset(cfg.source, split=cfg.split))
    except Exception as exc:  # datasets and the hub client raise many types; name the source once
        raise RetainSourceError(f"could not read retain.source '{cfg.source}' (split {cfg.split}): {exc}") from exc


def load_retain_prompts(cfg: RetainConfig) -> tuple[list[str], dict]:
    """The retain prompts (in source order, duplicates and excluded prompts dropped) and a record of the
    selection (counts, for the run folder)."""
    rows = _read_rows(cfg)
    if rows and cfg.prompt_field not in rows[0]:
        raise RetainSourceError(f"retain.source '{cfg.source}' has no column '{cfg.prompt_field}' "
                                f"(columns: {', '.join(rows[0])}); set retain.prompt_field")
    excluded = {normalise(t) for path in cfg.exclude for t in prompt_file_texts(path)}
    prompts, seen, dropped = [], set(), {"empty": 0, "excluded": 0, "duplicate": 0}
    for row in rows:
        text = str(row.get(cfg.prompt_field) or "").strip()
        key = normalise(text)
        reason = "empty" if not key else "excluded" if key in excluded else "duplicate" if key in seen else None
        if reason:
            dropped[reason] += 1
            continue
        seen.add(key)
        prompts.append(text)
    if cfg.max_prompts is not None:
        prompts = prompts[:cfg.max_prompts]
    if not prompts:
        raise RetainSourceError(f"no retain prompts left from '{cfg.source}' (dropped: {dropped})")
    return prompts, {"source": cfg.source, "rows_read": len(rows), "dropped": dropped, "prompts": len(prompts),
                     "excluded_files": list(cfg.exclude)}
