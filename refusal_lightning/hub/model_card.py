"""Model cards for pushed adapters, built from the files a run leaves next to its weights (STYLE.md, 7).

:func:`read_card_inputs` parses ``adapter_config.json``, ``config.yaml`` (the resolved LightningCLI config),
``data_stats.json`` and ``projection_stats.json`` and reports malformed files before the first upload;
:func:`render_model_card` fills the Markdown template ``model_card.md`` through huggingface_hub's
``ModelCard.from_template``, with ``ModelCardData`` as metadata (an evaluation ``summary.json`` as ``model-index``).
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
# metric in summary.json -> its CI bounds: one model-index entry and one table column each
RATES = {"refusal_rate": ("ci_low", "ci_high"), "fulfillment_rate": ("fulfillment_ci_low", "fulfillment_ci_high"),
         "accuracy": ("accuracy_ci_low", "accuracy_ci_high")}
# PEFT's save_pretrained writes huggingface_hub's default card; a README.md carrying these markers was never
# written by a person, so it is replaced, not kept.
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
    """The whole evaluation summary (``{"endpoints": {NAME: {"prompt_sets": {SET: {...}}}}, ...}``), or None."""


def read_card_inputs(name: str, adapter_dir: Path,
                     evaluation: dict[str, Any] | None = None) -> tuple[CardInputs | None, list[str]]:
    """Parse the files a card is built from; return the inputs and a list of problems (empty when fine)."""
    problems: list[str] = []
    (adapter_config, _), (train_config, text), (data_stats, _), (projection_stats, _) = (
        _read_mapping(adapter_dir / file, problems, required=file == ADAPTER_CONFIG)
        for file in (ADAPTER_CONFIG, "config.yaml", "data_stats.json", "projection_stats.json"))
    if problems or adapter_config is None:
        return None, problems
    return CardInputs(name, adapter_config, infer_kind(name, train_config), train_config, text, data_stats,
                      projection_stats, evaluation), []


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
    thread = config_value(train_config, "data.thread")
    if thread == "blue":
        return AdapterKind.REFUSAL
    if thread == "red":
        projecting = config_value(train_config, "model.projection.enabled") is True
        return AdapterKind.ORTHOGONAL_ATTACK if projecting else AdapterKind.VANILLA_ATTACK
    markers = {"orth": AdapterKind.ORTHOGONAL_ATTACK, "refus": AdapterKind.REFUSAL,
               "vanilla": AdapterKind.VANILLA_ATTACK, "attack": AdapterKind.VANILLA_ATTACK}
    return next((kind for marker, kind in markers.items() if marker in name.lower()), AdapterKind.UNKNOWN)


def config_value(config: dict[str, Any] | None, dotted: str) -> Any:
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
        # a local folder: a converted model (prepare-model) names the hub model it stands for; a tiny test
        # model names none
        from refusal_lightning.models.prepare import real_base_model_id

        base = real_base_model_id(base)
    return base if isinstance(base, str) and looks_like_hub_id(base, require_namespace=False) else None


def render_model_card(inputs: CardInputs, repo_id: str) -> str:
    """The full README.md: ``ModelCardData`` front matter, then the template's sections for the run's files."""
    endpoints = (inputs.evaluation or {}).get("endpoints", {})
    own = inputs.name in endpoints  # the adapter's own rates, else every endpoint's (never in model-index)
    shown = {inputs.name: endpoints[inputs.name]} if own else endpoints
    attack = inputs.kind in (AdapterKind.VANILLA_ATTACK, AdapterKind.ORTHOGONAL_ATTACK)
    base = inputs.adapter_config.get("base_model_name_or_path")
    extra_tags = {"harmful-finetuning": attack, "orthogonal-projection": inputs.kind is AdapterKind.ORTHOGONAL_ATTACK,
                  "qwen3": "qwen3" in str(base or "").lower()}
    # model-index names each result's dataset by its Hub id (the Hub links it); a prompt set read from a local
    # or bundled file has none, so its rates stay in the card's table only
    hub_ids = ((inputs.evaluation or {}).get("prompts") or {}).get("datasets") or {}
    eval_results = [EvalResult(task_type="text-generation", dataset_type=hub_ids[prompt_set], metric_type=rate,
                               dataset_name=PROMPT_SET_TITLES.get(prompt_set, prompt_set), metric_value=stats[rate])
                    for row in shown.values() for prompt_set, stats in row["prompt_sets"].items()
                    if isinstance(stats, dict) and isinstance(hub_ids.get(prompt_set), str)
                    for rate in RATES if isinstance(stats.get(rate), int | float)]
    indexed = own and bool(eval_results)
    data = ModelCardData(base_model=hub_base_model(inputs.adapter_config), library_name="peft", license=LICENSE,
                         datasets=[DATASET_ID], tags=[*BASE_TAGS, *(tag for tag, on in extra_tags.items() if on)],
                         pipeline_tag="text-generation", eval_results=eval_results if indexed else None,
                         model_name=repo_id.split("/")[-1] if indexed else None)
    card = ModelCard.from_template(
        data, template_path=str(resources.files(__package__) / TEMPLATE), repo_name=repo_id.split("/")[-1],
        repo_id=repo_id, card=inputs, kind=inputs.kind.value, attack=attack, local_base=base, endpoints=shown,
        own_endpoint=own, titles=PROMPT_SET_TITLES,
        benign=any(BENIGN in row["prompt_sets"] for row in shown.values()), config_value=config_value, inline=_inline,
        rate=_rate,
    )
    return str(card).rstrip("\n") + "\n"


def _read_mapping(path: Path, problems: list[str],
                  required: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON or YAML file holding a mapping, and its text; (None, None), with a problem line unless it is an
    absent optional file."""
    if not path.is_file():
        problems += [f"{path}: file not found"] if required else []
        return None, None
    language, parse = ("YAML", yaml.safe_load) if path.suffix == ".yaml" else ("JSON", json.loads)
    try:
        text = path.read_text(encoding="utf-8")
        value = parse(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        problems.append(f"{path}: not valid {language} ({first_line})")
        return None, None
    if not isinstance(value, dict):
        problems.append(f"{path}: expected {'a mapping at the top level' if language == 'YAML' else 'a JSON object'}")
        return None, None
    return value, text


def _rate(stats: dict[str, Any], metric: str) -> str:
    """A metric of ``RATES`` with its interval; ``n/a`` where it is missing (or not a number)."""
    return rate_with_ci(*(v if isinstance(v := stats.get(k), int | float) else None for k in (metric, *RATES[metric])))


def _inline(value: Any) -> str:
    """A value as one Markdown table cell or bullet: YAML's spelling of booleans, floats to 4 digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple | set):
        return ", ".join(_inline(v) for v in (sorted(value, key=str) if isinstance(value, set) else value))
    return str(value).replace("|", "\\|").replace("\n", " ")
