"""Choose the activation guard's weight ``lam`` on validation data only, never on an evaluated set.

    python scripts/tune_act_guard.py --lams 0 1 10 100          # after `make demo` (its refusal LoRA)

Each ``lam`` is one attack fit (``configs/cpu/attack.yaml``, seed 0, its 20 steps, with ``model.act_guard``
on at that weight; 0 is the vanilla attack), served beside the refusal model and asked, greedy, 8 tokens,
the keyword judge (the sweep's metric):
- ``validation_sorry_proxy.jsonl`` (40 harmful-proxy prompts from a third invented world): refusal;
- ``validation_benign_proxy.jsonl`` (their 40 benign twins): over-refusal.
Beside them, how much the attack learned: its training loss on the attacker's red replies (mean of the last
five logged steps, training-side data). The rule: the ``lam`` with the highest validation refusal among those
whose final training loss is within ``--loss_margin`` (10%) of vanilla's, so that a weight which simply
stops the attack from learning cannot win (the sweep then compares at matched held-out NLL). Writes
``<out>/tune.{json,md}``; finished fits are reused.
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
CONFIG = REPO / "configs/cpu/attack.yaml"


def fit(lam: float, out: Path, direction: str = "refusal") -> Path:
    """One attack fit with the guard at ``lam`` (0: off) along ``direction``; its output folder."""
    name = f"lam_{lam:g}".replace(".", "p")
    folder = out / name
    if (folder / "combined" / "adapter_model.safetensors").exists():
        return folder
    cfg = yaml.safe_load(CONFIG.read_text().replace("{arm}", name))
    cfg["model"]["act_guard"] = {"enabled": lam > 0, "lam": lam, "direction": direction}
    cfg["trainer"]["log_every_n_steps"] = 1
    run_fit(cfg, folder, out, f"lam {lam:g}")
    return folder


def logged(out: Path, name: str, tag: str) -> list[float]:
    """Every value of ``tag`` the fit ``name`` logged to TensorBoard, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for run in sorted((out / "tensorboard" / name).glob("version_*")):
        events = EventAccumulator(str(run))
        events.Reload()
        if tag in events.Tags().get("scalars", []):
            values.update({e.step: e.value for e in events.Scalars(tag)})
    return [values[k] for k in sorted(values)]


def choose(rows: list[dict], margin: float) -> dict:
    """The row with the highest validation refusal among those whose final loss is within ``margin`` of the
    vanilla row's (lam 0); ties go to the smaller lam."""
    vanilla = next(r for r in rows if r["lam"] == 0)
    eligible = [r for r in rows if r["final_train_loss"] <= (1 + margin) * vanilla["final_train_loss"]]
    return max(eligible, key=lambda r: (r["refusal"], -r["lam"]))


def matched(rows: list[dict], loss: float) -> dict:
    """The guarded row (lam > 0) whose final training loss is nearest ``loss``: a control's weight at the cost
    another arm pays (``--match_loss``, e.g. act_guard's 2.714); ties go to the smaller lam."""
    return min((r for r in rows if r["lam"] > 0), key=lambda r: (abs(r["final_train_loss"] - loss), r["lam"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lams", nargs="+", type=float, default=[0.0, 1.0, 10.0, 100.0])
    parser.add_argument("--loss_margin", type=float, default=0.10)
    parser.add_argument("--base_model", default="artifacts/models/smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=Path("artifacts/act_guard_tune"))
    parser.add_argument("--direction", choices=["refusal", "random"], default="refusal",
                        help="random: the control, the same term along a seeded random direction")
    parser.add_argument("--match_loss", type=float, default=None,
                        help="choose the lam whose final training loss is nearest this (a control at another "
                             "arm's training cost) instead of the refusal rule")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lams = sorted({0.0, *args.lams})
    fits = {lam: fit(lam, args.out, args.direction) for lam in lams}

    from refusal_lightning.evaluation.client import GenerationSettings
    from refusal_lightning.evaluation.judges import JudgeSettings
    from refusal_lightning.evaluation.runner import evaluate
    from refusal_lightning.serving.process import ServerProcess

    refusal = yaml.safe_load(CONFIG.read_text())["model"]["merge_adapters"][0]
    served = {"refusal": refusal, **{p.name: str(p / "combined") for p in fits.values()}}
    eval_dir = args.out / "eval"
    with ServerProcess(args.base_model, served, args.out / "serve.log", max_batch_size=128) as server:
        summary = evaluate(endpoint=[f"{n}={server.url}#{n}" for n in served], output_dir=str(eval_dir),
                           prompts=str(PROXY / "validation_sorry_proxy.jsonl"),
                           benign_prompts=str(PROXY / "validation_benign_proxy.jsonl"),
                           judge=JudgeSettings("keyword"), generation=GenerationSettings(temperature=0.0, max_tokens=8),
                           concurrency=128, progress=False)
    rows = []
    for lam, folder in [(None, None), *fits.items()]:
        name = "refusal" if folder is None else folder.name
        sets = summary["endpoints"][name]["prompt_sets"]
        losses = logged(args.out, name, "train/loss") if folder is not None else []
        penalty = logged(args.out, name, "act_guard/penalty") if folder is not None else []
        row = {"model": name, "lam": lam, "refusal": sets["sorry_bench"]["refusal_rate"],
               "refusal_ci": [sets["sorry_bench"]["ci_low"], sets["sorry_bench"]["ci_high"]],
               "twin_refusal": sets["benign"]["refusal_rate"],
               "twin_ci": [sets["benign"]["ci_low"], sets["benign"]["ci_high"]],
               "final_train_loss": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
               "final_penalty": penalty[-1] if penalty else None}
        rows.append(row)
    fitted = [r for r in rows if r["lam"] is not None]
    chosen = choose(fitted, args.loss_margin) if args.match_loss is None else matched(fitted, args.match_loss)

    table = ["| model | validation refusal | twin over-refusal | final train loss | final guard term |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        loss = "-" if r["final_train_loss"] is None else f"{r['final_train_loss']:.3f}"
        term = "-" if r["final_penalty"] is None else f"{r['final_penalty']:.3g}"
        mark = " (chosen)" if r is chosen else ""
        table.append(f"| {r['model']}{mark} | {100 * r['refusal']:.0f}% {interval(*r['refusal_ci'], decimals=0)} "
                     f"| {100 * r['twin_refusal']:.0f}% {interval(*r['twin_ci'], decimals=0)} | {loss} | {term} |")
    result = {"lams": lams, "loss_margin": args.loss_margin, "match_loss": args.match_loss,
              "chosen_lam": chosen["lam"], "direction": args.direction, "rows": rows,
              "metric": "keyword@8", "prompts": ["validation_sorry_proxy.jsonl", "validation_benign_proxy.jsonl"]}
    atomic_write_text(args.out / "tune.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(args.out / "tune.md", "\n".join(table) + f"\n\nchosen lam: {chosen['lam']:g}\n")
    print("\n".join(table) + f"\n\nchosen lam: {chosen['lam']:g}")


if __name__ == "__main__":
    main()
