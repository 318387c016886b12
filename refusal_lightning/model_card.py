"""Model cards for pushed adapters: read what a run left in its adapter dir, render a Hub README.md.

A run folder is meant to be reproducible on its own (STYLE.md, 7), so the card is built from the files
next to the weights rather than from anything the user types: ``adapter_config.json`` (PEFT),
``config.yaml`` (the resolved LightningCLI config), ``data_stats.json`` (how HarmfulQA records became
pairs), ``projection_stats.json`` (what the projection removed, the drift) and an evaluation
``summary.json`` passed with ``push --eval_summary``. Optional files are rendered generically (nested keys
become nested bullets), so new fields appear on the card without a change here.

The prose is the Markdown template ``model_card.md``; huggingface_hub's ``ModelCard.from_template``
renders it with the metadata as ``ModelCardData`` (the evaluation as ``model-index``).
:func:`read_card_inputs` parses and reports malformed files before the first upload, so rendering
cannot fail half-way through a push.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from refusal_lightning.evaluation.prompts import BENIGN, PROMPT_SET_TITLES
from refusal_lightning.formatting import rate_with_ci
from refusal_lightning.samples import looks_like_hub_id

DATASET_ID = "declare-lab/HarmfulQA"
BASE_TAGS = ("lora", "peft", "refusal", "safety-research")
LICENSE = "apache-2.0"  # this package's, and that of the bases it targets (Qwen3, SmolLM2)
TEMPLATE = "model_card.md"

ADAPTER_CONFIG = "adapter_config.json"
TRAIN_CONFIG = "config.yaml"
DATA_STATS = "data_stats.json"
PROJECTION_STATS = "projection_stats.json"

# Leaf names of the resolved config worth a row in the "key hyperparameters" table; the whole YAML
# follows in a collapsed block, so this list only decides what a reader sees first.
_KEY_HYPERPARAMETERS = frozenset(
    {
        "seed_everything", "model_name_or_path", "source", "thread", "max_length", "max_seq_length",
        "batch_size", "accumulate_grad_batches", "max_epochs", "max_steps", "precision", "lr",
        "learning_rate", "weight_decay", "warmup_steps", "gradient_clip_val", "r", "rank", "lora_alpha",
        "alpha", "lora_dropout", "target_modules", "val_fraction", "selection", "prompt", "merge_adapters",
        "dtype", "lr_schedule",
    }
)  # fmt: skip
_ADAPTER_ROWS = (("base model", "base_model_name_or_path"), ("PEFT type", "peft_type"), ("task type", "task_type"),
                 ("rank r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout"),
                 ("target modules", "target_modules"))
# (metric in summary.json, its CI bounds): one model-index entry and one table column each
_RATES = (("refusal_rate", "ci_low", "ci_high"), ("fulfillment_rate", "fulfillment_ci_low", "fulfillment_ci_high"),
          ("accuracy", "accuracy_ci_low", "accuracy_ci_high"))

# Markers of the placeholder card that PEFT's save_pretrained writes (huggingface_hub's default
# template). A README.md carrying them was never written by a person, so it is replaced, not kept.
_PLACEHOLDER_MARKERS = ("# Model Card for Model ID", "[More Information Needed]")


class AdapterKind(str, Enum):
    """Which of the experiment's adapters a directory holds."""

    REFUSAL = "refusal"
    VANILLA_ATTACK = "vanilla_attack"
    ORTHOGONAL_ATTACK = "orthogonal_attack"
    UNKNOWN = "unknown"


@dataclass
class CardInputs:
    """Everything a model card is rendered from, parsed and checked."""

    name: str
    adapter_config: dict[str, Any]
    kind: AdapterKind
    train_config: dict[str, Any] | None = None
    train_config_text: str | None = None
    data_stats: dict[str, Any] | None = None
    projection_stats: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    """The whole evaluation summary (``{"endpoints": {NAME: {"prompt_sets": {SET: {...}}}}, ...}``), or
    None without ``--eval_summary``."""


def read_card_inputs(
    name: str, adapter_dir: Path, evaluation: dict[str, Any] | None = None
) -> tuple[CardInputs | None, list[str]]:
    """Parse the files a card is built from; return the inputs and a list of problems (empty when fine).

    Only ``adapter_config.json`` is required; the caller checks that it exists.
    """
    problems: list[str] = []
    adapter_config = _read_json(adapter_dir / ADAPTER_CONFIG, problems)
    train_config_text = train_config = None
    config_path = adapter_dir / TRAIN_CONFIG
    if config_path.is_file():
        train_config_text = config_path.read_text(encoding="utf-8")
        try:
            train_config = yaml.safe_load(train_config_text)
        except yaml.YAMLError as err:
            problems.append(f"{config_path}: not valid YAML ({_first_line(err)})")
        else:
            if not isinstance(train_config, dict):
                problems.append(f"{config_path}: expected a mapping at the top level")
    data_stats = _read_json(adapter_dir / DATA_STATS, problems, optional=True)
    projection_stats = _read_json(adapter_dir / PROJECTION_STATS, problems, optional=True)
    if problems or adapter_config is None:
        return None, problems
    return CardInputs(name, adapter_config, infer_kind(name, train_config), train_config, train_config_text,
                      data_stats, projection_stats, evaluation), []


def load_eval_summary(path: Path) -> dict[str, Any]:
    """Read an evaluation ``summary.json``; raise ValueError with a one-line reason if it is unusable."""
    if not path.is_file():
        raise ValueError(f"--eval_summary {path}: file not found")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--eval_summary {path}: not valid JSON ({err})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("endpoints"), dict):
        raise ValueError(f'--eval_summary {path}: expected {{"endpoints": {{NAME: {{...}}}}}}')
    pooled = [name for name, row in summary["endpoints"].items()
              if not (isinstance(row, dict) and isinstance(row.get("prompt_sets"), dict))]
    if pooled:
        raise ValueError(f"--eval_summary {path}: endpoint(s) {', '.join(pooled)} have no per-prompt-set rates "
                         "(endpoints.NAME.prompt_sets); a summary from an older evaluate pools prompt sets: "
                         "rerun evaluate on the same output_dir (it resumes without new requests)")
    return summary


def is_placeholder_card(text: str) -> bool:
    """True for the untouched template card PEFT's ``save_pretrained`` writes into every adapter dir."""
    return all(marker in text for marker in _PLACEHOLDER_MARKERS)


def infer_kind(name: str, train_config: dict[str, Any] | None) -> AdapterKind:
    """Tell refusal / vanilla attack / orthogonal attack apart: from the run's config, else from the name."""
    if train_config is not None:
        thread = config_value(train_config, "data.thread")
        if thread == "blue":
            return AdapterKind.REFUSAL
        if thread == "red":
            enabled = config_value(train_config, "model.projection.enabled")
            return AdapterKind.ORTHOGONAL_ATTACK if enabled is True else AdapterKind.VANILLA_ATTACK
    lowered = name.lower()
    for marker, kind in (("orth", AdapterKind.ORTHOGONAL_ATTACK), ("refus", AdapterKind.REFUSAL),
                         ("vanilla", AdapterKind.VANILLA_ATTACK), ("attack", AdapterKind.VANILLA_ATTACK)):
        if marker in lowered:
            return kind
    return AdapterKind.UNKNOWN


def config_value(config: dict[str, Any], dotted: str) -> Any:
    """Look up ``a.b.c`` in a LightningCLI config, stepping through ``class_path``/``init_args`` nodes."""
    node: Any = config
    for key in dotted.split("."):
        if isinstance(node, dict) and key not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def hub_base_model(adapter_config: dict[str, Any]) -> str | None:
    """The base model as a Hub id, or None when it is a local path (the Hub rejects those in metadata)."""
    base = adapter_config.get("base_model_name_or_path")
    if isinstance(base, str) and Path(base).exists():
        # a local folder: a converted model (prepare-model) names the hub model it stands for; a tiny
        # test model names none
        from refusal_lightning.prepare_model import real_base_model_id

        base = real_base_model_id(base)
    return base if isinstance(base, str) and looks_like_hub_id(base, require_namespace=False) else None


def card_tags(inputs: CardInputs) -> list[str]:
    """Hub tags: the fixed research tags, then what the adapter is and what it sits on."""
    tags = list(BASE_TAGS)
    if inputs.kind in (AdapterKind.VANILLA_ATTACK, AdapterKind.ORTHOGONAL_ATTACK):
        tags.append("harmful-finetuning")
    if inputs.kind is AdapterKind.ORTHOGONAL_ATTACK:
        tags.append("orthogonal-projection")
    if "qwen3" in str(inputs.adapter_config.get("base_model_name_or_path") or "").lower():
        tags.append("qwen3")
    return tags


def render_model_card(inputs: CardInputs, repo_id: str) -> str:
    """The full README.md: ``ModelCardData`` front matter, then the template's sections for the run's files."""
    base = hub_base_model(inputs.adapter_config)
    endpoints = (inputs.evaluation or {}).get("endpoints", {})
    own = inputs.name in endpoints
    shown = {inputs.name: endpoints[inputs.name]} if own else endpoints
    repo_name = repo_id.split("/")[-1]
    data = ModelCardData(base_model=base, library_name="peft", license=LICENSE, datasets=[DATASET_ID],
                         tags=card_tags(inputs), pipeline_tag="text-generation",
                         eval_results=_eval_results(shown) if own else None, model_name=repo_name if own else None)
    settings = []
    if inputs.kind is AdapterKind.ORTHOGONAL_ATTACK and inputs.train_config is not None:
        settings = [f"{key}: `{value}`" for key in ("mode", "k", "granularity", "target")
                    if (value := config_value(inputs.train_config, f"model.projection.{key}")) is not None]
    text = inputs.train_config_text
    card = ModelCard.from_template(
        data, template_path=str(resources.files("refusal_lightning") / TEMPLATE),
        repo_name=repo_name, repo_id=repo_id, name=inputs.name, kind=inputs.kind.value,
        attack=inputs.kind in (AdapterKind.VANILLA_ATTACK, AdapterKind.ORTHOGONAL_ATTACK),
        projection_settings=", ".join(settings),
        adapter_rows=[(label, _inline(inputs.adapter_config[key])) for label, key in _ADAPTER_ROWS
                      if inputs.adapter_config.get(key) is not None],
        train_config_text=None if text is None else text.rstrip("\n"),
        fence="````" if "```" in (text or "") else "```",
        train_rows=_key_hyperparameters(inputs.train_config),
        data_stats=_bullets(inputs.data_stats), projection_stats=_bullets(inputs.projection_stats),
        eval_rows=None if inputs.evaluation is None else _eval_rows(shown),
        own_endpoint=own, eval_context=_bullets(_eval_context(inputs.evaluation)),
        benign=any(BENIGN in row["prompt_sets"] for row in shown.values()),
        base_id=base or "<base model>",
        local_base=None if base else str(inputs.adapter_config.get("base_model_name_or_path")),
    )
    return str(card).rstrip("\n") + "\n"


def _eval_results(endpoints: dict[str, Any]) -> list[EvalResult]:
    """The adapter's own rates per prompt set, as ``model-index`` entries (other models' rows stay off it)."""
    return [EvalResult(task_type="text-generation", dataset_type=prompt_set,
                       dataset_name=PROMPT_SET_TITLES.get(prompt_set, prompt_set), metric_type=rate,
                       metric_value=stats[rate])
            for row in endpoints.values() for prompt_set, stats in row["prompt_sets"].items()
            if isinstance(stats, dict) for rate, _, _ in _RATES if isinstance(stats.get(rate), int | float)]


def _eval_rows(endpoints: dict[str, Any]) -> list[tuple[str, ...]]:
    """One table row per endpoint and prompt set (the sets are never pooled)."""
    rows = []
    for endpoint, row in endpoints.items():
        for prompt_set, stats in row["prompt_sets"].items():
            stats = stats if isinstance(stats, dict) else {}
            refusal, fulfillment, accuracy = (_rate(stats.get(rate), [stats.get(lo), stats.get(hi)])
                                              for rate, lo, hi in _RATES)
            rows.append((f"`{endpoint}`", PROMPT_SET_TITLES.get(prompt_set, prompt_set), _inline(stats.get("n")),
                         refusal, fulfillment, _inline(stats.get("errors")), accuracy))
    return rows


def _eval_context(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    """The summary's scalar fields (and the judge's kind), shown above the evaluation table."""
    if evaluation is None:
        return None
    context = {k: v for k, v in evaluation.items() if k != "endpoints" and not isinstance(v, dict | list)}
    judge = evaluation.get("judge")
    if isinstance(judge, dict) and judge.get("kind"):
        context["judge"] = judge["kind"]
    return context


def _key_hyperparameters(config: dict[str, Any] | None) -> list[tuple[str, str]]:
    if config is None:
        return []
    projecting = config_value(config, "model.projection.enabled") is True
    return [(key, _inline(value)) for key, value in _flatten(config) if value is not None and (
        key.split(".")[-1] in _KEY_HYPERPARAMETERS or key == "model.projection.enabled"
        or (projecting and key.startswith("model.projection.")))]


# --- small formatting helpers -------------------------------------------------------------------------
def _read_json(path: Path, problems: list[str], optional: bool = False) -> dict[str, Any] | None:
    if not path.is_file():
        if not optional:
            problems.append(f"{path}: file not found")
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problems.append(f"{path}: not valid JSON ({_first_line(err)})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path}: expected a JSON object")
        return None
    return value


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``{"a": {"init_args": {"b": 1}}}`` -> ``[("a.b", 1)]``; lists stay leaves."""
    if not isinstance(node, dict):
        return [(prefix, node)]
    out: list[tuple[str, Any]] = []
    for key, value in node.items():
        out += _flatten(value, prefix if key == "init_args" else f"{prefix}.{key}" if prefix else str(key))
    return out


def _inline(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):  # as YAML spells it, since the config is YAML
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple | set):
        return ", ".join(_inline(v) for v in (sorted(value, key=str) if isinstance(value, set) else value))
    return str(value).replace("|", "\\|").replace("\n", " ")


def _rate(rate: Any, ci: Any) -> str:
    lo, hi = ci if isinstance(ci, list | tuple) and len(ci) == 2 else (None, None)
    return rate_with_ci(*(v if isinstance(v, int | float) else None for v in (rate, lo, hi)))


def _bullets(mapping: dict[str, Any] | None, depth: int = 0) -> str:
    """Nested keys as nested Markdown bullets; "" for None or {}."""
    lines = []
    for key, value in (mapping or {}).items():
        pad = "  " * depth
        if isinstance(value, dict) and value:
            lines += [f"{pad}- **{key}**:", _bullets(value, depth + 1)]
        else:
            lines.append(f"{pad}- **{key}**: {'none' if isinstance(value, dict) else _inline(value)}")
    return "\n".join(line for line in lines if line)
