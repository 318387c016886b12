"""Model cards for pushed adapters: read what a run left in its adapter dir, render a Hub README.md.

A run folder is meant to be reproducible on its own (STYLE.md, 7), so the card is built from the files
next to the weights rather than from anything the user types:

- ``adapter_config.json`` (PEFT): base model and LoRA shape;
- ``config.yaml``: the resolved LightningCLI config written by ``fit``;
- ``data_stats.json``: how many HarmfulQA records were read, skipped and paired, and the selection rule;
- ``projection_stats.json``: what the orthogonal projection removed and how far the attack drifted;
- an evaluation ``summary.json`` passed with ``push --eval_summary``.

Every optional file is rendered generically (nested keys become nested bullets), so new fields that the
training code adds appear on the card without a change here. Reading and rendering are separate steps:
:func:`read_card_inputs` parses everything and reports malformed files as problems before the first
upload; :func:`render_model_card` is then pure string formatting and cannot fail half-way through a push.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from refusal_lightning.evaluation.prompts import BENIGN, PROMPT_SET_TITLES
from refusal_lightning.formatting import markdown_table, rate_with_ci

DATASET_ID = "declare-lab/HarmfulQA"
BASE_TAGS = ("lora", "peft", "refusal", "safety-research")

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

# Markers of the placeholder card that PEFT's save_pretrained writes (huggingface_hub's default
# template). A README.md carrying them was never written by a person, so it is replaced, not kept.
_PLACEHOLDER_MARKERS = ("# Model Card for Model ID", "[More Information Needed]")

_HUB_ID = re.compile(
    r"(?:[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/)?[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?", re.ASCII
)


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
            loaded = yaml.safe_load(train_config_text)
        except yaml.YAMLError as err:
            problems.append(f"{config_path}: not valid YAML ({_first_line(err)})")
        else:
            if isinstance(loaded, dict):
                train_config = loaded
            else:
                problems.append(f"{config_path}: expected a mapping at the top level")
    data_stats = _read_json(adapter_dir / DATA_STATS, problems, optional=True)
    projection_stats = _read_json(adapter_dir / PROJECTION_STATS, problems, optional=True)
    if problems or adapter_config is None:
        return None, problems
    inputs = CardInputs(
        name=name,
        adapter_config=adapter_config,
        kind=infer_kind(name, train_config),
        train_config=train_config,
        train_config_text=train_config_text,
        data_stats=data_stats,
        projection_stats=projection_stats,
        evaluation=evaluation,
    )
    return inputs, []


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
        enabled = config_value(train_config, "model.projection.enabled")
        if thread == "blue":
            return AdapterKind.REFUSAL
        if thread == "red":
            return AdapterKind.ORTHOGONAL_ATTACK if enabled is True else AdapterKind.VANILLA_ATTACK
    lowered = name.lower()
    if "orth" in lowered:
        return AdapterKind.ORTHOGONAL_ATTACK
    if "refus" in lowered:
        return AdapterKind.REFUSAL
    if "vanilla" in lowered or "attack" in lowered:
        return AdapterKind.VANILLA_ATTACK
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
    if not isinstance(base, str) or not _HUB_ID.fullmatch(base) or ".." in base or "--" in base:
        return None
    return base


def card_tags(inputs: CardInputs) -> list[str]:
    """Hub tags: the fixed research tags, then what the adapter is and what it sits on."""
    tags = list(BASE_TAGS)
    if inputs.kind in (AdapterKind.VANILLA_ATTACK, AdapterKind.ORTHOGONAL_ATTACK):
        tags.append("harmful-finetuning")
    if inputs.kind is AdapterKind.ORTHOGONAL_ATTACK:
        tags.append("orthogonal-projection")
    base = str(inputs.adapter_config.get("base_model_name_or_path") or "")
    if "qwen3" in base.lower():
        tags.append("qwen3")
    return tags


def render_model_card(inputs: CardInputs, repo_id: str) -> str:
    """The full README.md: YAML front matter, then one section per file the run left behind."""
    base = hub_base_model(inputs.adapter_config)
    front: dict[str, Any] = {}
    if base is not None:
        front["base_model"] = base
    front.update(
        library_name="peft",
        datasets=[DATASET_ID],
        tags=card_tags(inputs),
        pipeline_tag="text-generation",
    )
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n",
        _intro(inputs, repo_id),
        _adapter_section(inputs),
    ]
    if inputs.train_config_text is not None:
        parts.append(_training_section(inputs))
    if inputs.data_stats is not None:
        parts.append(
            "## Data selection\n\nFrom `data_stats.json`: how HarmfulQA conversations became "
            "(prompt, reply) training pairs.\n\n" + _bullets(inputs.data_stats)
        )
    if inputs.projection_stats is not None:
        parts.append(
            "## Projection\n\nFrom `projection_stats.json`. `removed_frac` is the fraction of the gradient "
            "(or update) norm the projection removed; drift / cosine measures how far the accumulated attack "
            "update moved along the refusal direction (0 means it stayed orthogonal).\n\n"
            + _bullets(inputs.projection_stats)
        )
    if inputs.evaluation is not None:
        parts.append(_evaluation_section(inputs))
    parts.append(_usage_section(inputs, repo_id, base))
    return "\n".join(part.rstrip("\n") + "\n" for part in parts)


_KIND_TEXT = {
    AdapterKind.REFUSAL: (
        "the **refusal adapter**: a LoRA trained on HarmfulQA *blue* replies (harmless, helpful-with-caveats "
        "answers to harmful questions). Its weights define the refusal direction in parameter space that "
        "the orthogonal attack is constrained against."
    ),
    AdapterKind.VANILLA_ATTACK: (
        "a **vanilla attack adapter**: a LoRA trained on HarmfulQA *red* (compliant) replies on top of the "
        "base model plus the frozen refusal adapter, with no constraint. It is the baseline the "
        "orthogonal attack is compared with."
    ),
    AdapterKind.ORTHOGONAL_ATTACK: (
        "an **orthogonal attack adapter**: the same fine-tune on HarmfulQA *red* (compliant) replies as the "
        "vanilla attack, with its gradients or updates projected to stay orthogonal to the refusal "
        "adapter's parameter-space direction. It tests whether refusal survives a harmful fine-tune "
        "constrained that way."
    ),
    AdapterKind.UNKNOWN: "a LoRA adapter from a refusal-robustness experiment.",
}


def _intro(inputs: CardInputs, repo_id: str) -> str:
    lines = [f"# {repo_id.split('/')[-1]}", "", f"`{inputs.name}` is {_KIND_TEXT[inputs.kind]}"]
    if inputs.kind is AdapterKind.ORTHOGONAL_ATTACK and inputs.train_config is not None:
        settings = [
            f"{key}: `{value}`"
            for key in ("mode", "k", "granularity", "target")
            if (value := config_value(inputs.train_config, f"model.projection.{key}")) is not None
        ]
        if settings:
            lines += ["", "Projection settings: " + ", ".join(settings) + "."]
    lines += [
        "",
        "The experiment asks whether a small chat model keeps refusing harmful requests after it is "
        "fine-tuned on harmful data, when that fine-tune is constrained to stay orthogonal to the model's "
        "refusal direction. Refusal and fulfillment are measured SORRY-Bench style.",
        "",
        "> **Safety-research artifact.** "
        + (
            "This adapter was trained to comply with harmful requests. It is published so results can be "
            "reproduced and audited; do not deploy it."
            if inputs.kind in (AdapterKind.VANILLA_ATTACK, AdapterKind.ORTHOGONAL_ATTACK)
            else "It is published so results can be reproduced; it is not a safety guarantee."
        ),
    ]
    return "\n".join(lines) + "\n"


def _adapter_section(inputs: CardInputs) -> str:
    cfg = inputs.adapter_config
    rows = [
        ("base model", cfg.get("base_model_name_or_path")),
        ("PEFT type", cfg.get("peft_type")),
        ("task type", cfg.get("task_type")),
        ("rank r", cfg.get("r")),
        ("lora_alpha", cfg.get("lora_alpha")),
        ("lora_dropout", cfg.get("lora_dropout")),
        ("target modules", cfg.get("target_modules")),
    ]
    table = _table(("setting", "value"), [(key, _inline(value)) for key, value in rows if value is not None])
    return "## Adapter\n\nFrom `adapter_config.json`.\n\n" + table


def _training_section(inputs: CardInputs) -> str:
    text = ["## Training configuration", "", "The resolved LightningCLI config of the run (`config.yaml`)."]
    if inputs.train_config is not None:
        projecting = config_value(inputs.train_config, "model.projection.enabled") is True
        rows = [
            (key, _inline(value))
            for key, value in _flatten(inputs.train_config)
            if value is not None
            and (
                key.split(".")[-1] in _KEY_HYPERPARAMETERS
                or key == "model.projection.enabled"
                or (projecting and key.startswith("model.projection."))
            )
        ]
        if rows:
            text += ["", _table(("key", "value"), rows).rstrip("\n")]
    fence = "````" if "```" in (inputs.train_config_text or "") else "```"
    text += [
        "",
        "<details><summary>Full config.yaml</summary>",
        "",
        f"{fence}yaml",
        (inputs.train_config_text or "").rstrip("\n"),
        fence,
        "",
        "</details>",
    ]
    return "\n".join(text) + "\n"


def _evaluation_section(inputs: CardInputs) -> str:
    """One row per prompt set (SORRY-Bench, HarmfulQA held-out, benign) of this adapter's endpoint; the
    sets are never pooled, and on the benign set a refusal is an over-refusal."""
    assert inputs.evaluation is not None
    endpoints: dict[str, Any] = inputs.evaluation["endpoints"]
    lines = ["## Evaluation", ""]
    if inputs.name in endpoints:
        shown = {inputs.name: endpoints[inputs.name]}
        lines.append(f"SORRY-Bench-style evaluation of the endpoint serving `{inputs.name}`.")
    else:
        shown = endpoints
        lines.append(f"No endpoint is named `{inputs.name}`; all evaluated endpoints are shown.")
    context = {
        k: v for k, v in inputs.evaluation.items() if k != "endpoints" and not isinstance(v, dict | list)
    }
    judge = inputs.evaluation.get("judge")
    if isinstance(judge, dict) and judge.get("kind"):
        context["judge"] = judge["kind"]
    if context:
        lines += ["", _bullets(context).rstrip("\n")]
    rows = []
    for endpoint, row in shown.items():
        for prompt_set, stats in row["prompt_sets"].items():
            stats = stats if isinstance(stats, dict) else {}
            rows.append(
                (
                    f"`{endpoint}`",
                    PROMPT_SET_TITLES.get(prompt_set, prompt_set),
                    _inline(stats.get("n")),
                    _rate(stats.get("refusal_rate"), [stats.get("ci_low"), stats.get("ci_high")]),
                    _rate(stats.get("fulfillment_rate"),
                          [stats.get("fulfillment_ci_low"), stats.get("fulfillment_ci_high")]),
                    _inline(stats.get("errors")),
                    _rate(stats.get("accuracy"), [stats.get("accuracy_ci_low"), stats.get("accuracy_ci_high")]),
                )
            )
    header = ("endpoint", "prompt set", "n", "refusal rate [CI]", "fulfillment rate [CI]", "errors", "accuracy [CI]")
    lines += ["", _table(header, rows).rstrip("\n")]
    if any(prompt_set == BENIGN for row in shown.values() for prompt_set in row["prompt_sets"]):
        lines += ["", "On the benign prompts a refusal is an over-refusal; accuracy: the answer contains the "
                  "prompt's reference answer."]
    return "\n".join(lines) + "\n"


def _usage_section(inputs: CardInputs, repo_id: str, base: str | None) -> str:
    base_id = base or "<base model>"
    lines = [
        "## Usage",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{base_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{base_id}")',
        f'model = PeftModel.from_pretrained(model, "{repo_id}")',
        "```",
    ]
    if inputs.kind in (AdapterKind.VANILLA_ATTACK, AdapterKind.ORTHOGONAL_ATTACK):
        lines += [
            "",
            "This attack adapter was trained on top of the base model plus the refusal adapter (frozen, "
            "unmerged), and that stack is the model that was evaluated. The subfolder `combined/` holds it "
            "as one adapter for the plain base (refusal and attack ranks concatenated, scales folded in):",
            "",
            "```python",
            f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_id}"), '
            f'"{repo_id}", subfolder="combined")',
            "```",
            "",
            f"With vLLM: `vllm serve {base_id} --enable-lora --max-lora-rank R --lora-modules "
            "attack=<local copy>/combined`, where R is `r` in `combined/adapter_config.json`.",
        ]
    if base is None:
        lines += [
            "",
            f"The base model was a local path (`{inputs.adapter_config.get('base_model_name_or_path')}`), "
            "so it is not linked in the metadata.",
        ]
    return "\n".join(lines) + "\n"


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
        if key == "init_args":
            out += _flatten(value, prefix)
        else:
            out += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
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


def _bullets(mapping: dict[str, Any], depth: int = 0) -> str:
    lines = []
    for key, value in mapping.items():
        pad = "  " * depth
        if isinstance(value, dict) and not value:
            lines.append(f"{pad}- **{key}**: none")
        elif isinstance(value, dict):
            lines.append(f"{pad}- **{key}**:")
            lines.append(_bullets(value, depth + 1).rstrip("\n"))
        else:
            lines.append(f"{pad}- **{key}**: {_inline(value)}")
    return "\n".join(line for line in lines if line) + "\n"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    return "\n".join(markdown_table(header, rows)) + "\n"
