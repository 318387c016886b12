"""Choose the retain term's kind and weight on validation data only, never on an evaluated set.

    python scripts/tune_retain.py --settings off kl:1 distill:1 kl:4      # after `make setup`
    python scripts/tune_retain.py --settings kl:1:batch_size=4:source=refusal_lightning/data/proxy/retain_proxy.jsonl

Each setting is one refusal fit (``configs/cpu/refusal_lora.yaml`` with only ``model.retain`` and the output
folders changed), served beside the base model and asked:
- ``validation_sorry_proxy.jsonl`` (40 harmful-proxy prompts from a third invented world): refusal;
- ``validation_benign_proxy.jsonl`` (their 40 benign twins): over-refusal;
- the last ``--heldout_facts`` training-side factual rows (``benign_proxy.jsonl`` rows outside
  ``benign_eval.jsonl``): accuracy against their references. The retain prompts of these fits are the
  rows before them (``retain.max_prompts``), so no validation fact is a retain prompt; a retain source
  must therefore end with those facts (``retain_proxy.jsonl`` does).
A setting is ``off`` or ``KIND:WEIGHT`` followed by any ``:KEY=VALUE`` of the retain section.
Greedy decoding, 24 tokens, the keyword judge: as the demo evaluates. Writes ``<out>/tune.{json,md}``;
finished fits are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))

from tuning_fit import run_fit  # noqa: E402

from refusal_lightning.files import atomic_write_text  # noqa: E402
from refusal_lightning.formatting import interval  # noqa: E402

PROXY = REPO / "refusal_lightning/data/proxy"
CONFIG = REPO / "configs/cpu/refusal_lora.yaml"


def parse_setting(setting: str) -> dict:
    """``off`` or ``KIND:WEIGHT[:KEY=VALUE...]`` (e.g. ``kl:1:batch_size=4:source=PATH``) -> the retain section's
    changes (YAML values)."""
    if setting == "off":
        return {"enabled": False}
    kind, weight, *extra = setting.split(":")
    changes = {"enabled": True, "kind": kind, "weight": float(weight)}
    for item in extra:
        key, _, value = item.partition("=")
        changes[key] = yaml.safe_load(value)
    return changes


def retain_section(setting: str, heldout_facts: int) -> dict:
    """The demo config's retain section with ``setting`` applied and the last ``heldout_facts`` prompts (the
    validation facts) held out of the retain prompts."""
    from refusal_lightning.train.retain import RetainConfig, load_retain_prompts

    section = {**yaml.safe_load(CONFIG.read_text())["model"]["retain"], **parse_setting(setting)}
    if section["enabled"]:
        prompts, _ = load_retain_prompts(RetainConfig(**{**section, "max_prompts": None}))
        section["max_prompts"] = len(prompts) - heldout_facts
    return section


def fit(setting: str, out: Path, heldout_facts: int) -> Path:
    """One refusal fit with the retain ``setting``; its adapter folder."""
    folder = out / setting.replace(":", "_").replace(".", "p").replace("=", "-").replace("/", "-")
    if (folder / "adapter_model.safetensors").exists():
        return folder
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["model"]["retain"] = retain_section(setting, heldout_facts)
    run_fit(cfg, folder, out, setting)
    return folder


def validation_files(out: Path, heldout_facts: int) -> tuple[Path, set]:
    """The benign validation file (twins + the last ``heldout_facts`` training-side facts, which no tuning fit
    retains on) and the twins' ids."""
    from refusal_lightning.train.retain import RetainConfig, load_retain_prompts

    retain = RetainConfig(**{**yaml.safe_load(CONFIG.read_text())["model"]["retain"], "max_prompts": None})
    prompts, _ = load_retain_prompts(retain)
    facts = {json.loads(line)["prompt"]: json.loads(line) for line in (PROXY / "benign_proxy.jsonl").open()}
    held = prompts[-heldout_facts:]
    assert all(p in facts for p in held), "the retain source must end with the training-side facts"
    twins = [json.loads(line) for line in (PROXY / "validation_benign_proxy.jsonl").open()]
    rows = twins + [{"id": 5000 + i, "prompt": p, "reference": facts[p]["reference"], "kind": "factual"}
                    for i, p in enumerate(held)]
    path = out / "validation_benign_and_facts.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path, {r["id"] for r in twins}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=["off", "kl:1", "distill:1"])
    parser.add_argument("--heldout_facts", type=int, default=40)
    parser.add_argument("--base_model", default="artifacts/models/smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=Path("artifacts/retain_tune"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not Path(args.base_model, "model.safetensors").exists():
        from refusal_lightning.models.prepare import prepare_model

        prepare_model(output_dir=args.base_model)

    benign, twin_ids = validation_files(args.out, args.heldout_facts)
    models = {s: fit(s, args.out, args.heldout_facts) for s in args.settings}

    from refusal_lightning.evaluation.client import GenerationSettings
    from refusal_lightning.evaluation.judges import JudgeSettings
    from refusal_lightning.evaluation.metrics import wilson_interval
    from refusal_lightning.evaluation.runner import evaluate
    from refusal_lightning.serving.process import ServerProcess

    eval_dir = args.out / "eval"
    served = {s: p.name for s, p in models.items()}  # a setting may hold '=' and '/': its folder's name cannot
    with ServerProcess(args.base_model, {served[s]: str(p) for s, p in models.items()}, args.out / "serve.log",
                       max_batch_size=128) as server:
        endpoints = [f"base={server.url}#base", *(f"{served[s]}={server.url}#{served[s]}" for s in models)]
        summary = evaluate(endpoint=endpoints, output_dir=str(eval_dir),
                           prompts=str(PROXY / "validation_sorry_proxy.jsonl"), benign_prompts=str(benign),
                           judge=JudgeSettings("keyword"),
                           generation=GenerationSettings(temperature=0.0, max_tokens=24),
                           concurrency=128, progress=False)
    twin_labels: dict[str, list[bool]] = {}
    for line in (eval_dir / "judgments.jsonl").open():
        row = json.loads(line)
        # benign ids are written as "benign-<id>"
        if row["prompt_set"] == "benign" and int(str(row["question_id"]).rsplit("-", 1)[-1]) in twin_ids:
            twin_labels.setdefault(row["endpoint"], []).append(row["label"] == "refusal")
    rows = []
    for setting in ["base", *models]:
        name = served.get(setting, setting)
        sets = summary["endpoints"][name]["prompt_sets"]
        twins = twin_labels[name]
        rows.append({"model": setting, "refusal": sets["sorry_bench"]["refusal_rate"],
                     "refusal_ci": [sets["sorry_bench"]["ci_low"], sets["sorry_bench"]["ci_high"]],
                     "twin_refusal": sum(twins) / len(twins),
                     "twin_ci": list(wilson_interval(sum(twins), len(twins))), "twins": len(twins),
                     "fact_accuracy": sets["benign"]["accuracy"],
                     "fact_ci": [sets["benign"]["accuracy_ci_low"], sets["benign"]["accuracy_ci_high"]]})
    table = ["| model | validation refusal | twin refusal | held-out fact accuracy |", "|---|---:|---:|---:|"]
    def cell(row: dict, key: str, ci: str) -> str:
        return f"{100 * row[key]:.0f}% {interval(*row[ci], decimals=0)}"

    table += [f"| {r['model']} | {cell(r, 'refusal', 'refusal_ci')} | {cell(r, 'twin_refusal', 'twin_ci')} "
              f"| {cell(r, 'fact_accuracy', 'fact_ci')} |" for r in rows]
    result = {"settings": {s: retain_section(s, args.heldout_facts) for s in args.settings},
              "heldout_facts": args.heldout_facts, "rows": rows}
    atomic_write_text(args.out / "tune.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / "tune.md", "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
