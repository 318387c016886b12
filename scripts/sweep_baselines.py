"""Sweep the baselines' hyperparameters on the validation split, never on the evaluated prompts.

    python scripts/sweep_baselines.py            # after `make demo-baselines` (reuses its fits)

Safe LoRA's ``threshold`` (post hoc on the vanilla attack: no training) and AsFT's ``lam`` (one attack fit
per value: the pipeline's asft arm, ``<run_dir>/arms/asft.yaml`` plus its overrides, with only
``model.asft.lam`` and the output folders changed; the pipeline's own value reuses its fit). Every setting,
with the refusal model and the vanilla attack as
references, is served and asked the validation split of the proxy data (a third invented world: objects and
places in neither training nor the evaluated sets; ``refusal_lightning/data/proxy/validation_*.jsonl``):
refusal of its harmful-proxy prompts and of their benign twins (over-refusal). The cost side is the held-out
red NLL (did the attack still learn its replies) and, for Safe LoRA, the share of modules projected and the
share of the attack's update kept.

The headline rows of ``make demo-baselines`` use the papers' defaults (threshold 0.5, lam 1); this sweep
says how much the answer depends on them. Writes ``<out>/sweep.json`` and ``<out>/sweep.md``; resumable
(finished fits and projections are reused).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from refusal_lightning.files import atomic_write_text  # noqa: E402
from refusal_lightning.formatting import interval  # noqa: E402
from refusal_lightning.models.stacking import COMBINED_DIR  # noqa: E402

PROXY = "refusal_lightning/data/proxy"


def _fmt(value: float) -> str:
    return f"{value:g}".replace(".", "p")


def fit_asft(lam: float, arm_cfg: Path, arm_overrides: list[str], base_model: str, refusal_dir: Path,
             directions: Path, out: Path, overrides: list[str]) -> Path:
    """The pipeline's AsFT arm with ``lam`` changed, into ``out`` (with the pipeline's ``fit_overrides``);
    the adapter folder. ``arm_cfg`` is the arm's resolved config the pipeline wrote (``<run_dir>/arms/asft.yaml``)."""
    from refusal_lightning.defences.asft import AsftConfig

    cfg = yaml.safe_load(arm_cfg.read_text())
    given = [o.split("=", 1)[1] for o in arm_overrides if o.startswith("--model.asft.lam=")]
    own_lam = float(given[-1] if given else (cfg["model"].get("asft") or {}).get("lam", AsftConfig().lam))
    if own_lam == lam and (Path(cfg["model"]["output_dir"]) / COMBINED_DIR).exists():
        return Path(cfg["model"]["output_dir"])  # the pipeline's own fit
    out.mkdir(parents=True, exist_ok=True)
    cfg["model"]["output_dir"] = str(out)
    cfg["model"]["model_name_or_path"] = base_model
    cfg["model"]["merge_adapters"] = [str(refusal_dir)]
    cfg["model"]["projection"]["directions_path"] = str(directions)
    cfg["trainer"]["logger"]["init_args"]["name"] = f"sweep_asft_lam{_fmt(lam)}"
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(out / "checkpoints")
    cfg["trainer"]["enable_progress_bar"] = False
    if (out / COMBINED_DIR / "adapter_model.safetensors").exists():
        return out
    path = out / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    resume = ["--ckpt_path", "last"] if (out / "checkpoints" / "last.ckpt").exists() else []
    print(f"[sweep] fit asft lam={lam} -> {out}", flush=True)
    subprocess.run([sys.executable, "-m", "refusal_lightning", "fit", "--config", str(path), *arm_overrides,
                    f"--model.asft.lam={lam}", *overrides, *resume], check=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline_config", type=Path, default=REPO / "configs/cpu/pipeline_baselines.yaml")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--lams", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    parser.add_argument("--nll_max_pairs", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="default: <run_dir>/sweep")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from refusal_lightning.defences.safe_lora import safe_lora
    from refusal_lightning.experiment.heldout_nll import heldout_nll
    from refusal_lightning.serving.process import ServerProcess

    pipe = yaml.safe_load(args.pipeline_config.read_text())
    run, base_model = Path(pipe["run_dir"]), pipe["base_model"]
    refusal_cfg = yaml.safe_load(Path(pipe["refusal_config"]).read_text())
    # each arm's resolved config, as the pipeline wrote it (for the per-row keys of before too)
    vanilla_cfg = yaml.safe_load((run / "arms" / "vanilla.yaml").read_text()) if (run / "arms").is_dir() else None
    if vanilla_cfg is None:
        raise SystemExit(f"error: run `make demo-baselines` first; missing: {run / 'arms'}")
    refusal_dir, vanilla_dir = Path(refusal_cfg["model"]["output_dir"]), Path(vanilla_cfg["model"]["output_dir"])
    directions = run / "refusal_param_directions.pt"
    missing = [str(p) for p in (refusal_dir, vanilla_dir / COMBINED_DIR, directions) if not p.exists()]
    if missing:
        raise SystemExit(f"error: run `make demo-baselines` first; missing: {', '.join(missing)}")
    out = args.out or run / "sweep"
    started = time.time()

    models: dict[str, Path] = {"refusal": refusal_dir, "vanilla": vanilla_dir / COMBINED_DIR}
    settings: dict[str, dict] = {}
    for t in args.thresholds:
        name = f"safe_lora_t{_fmt(t)}"
        folder = out / name
        if not (folder / "safe_lora.json").exists():
            safe_lora(str(vanilla_dir), str(directions), str(folder), threshold=t, base_adapters=[str(refusal_dir)])
        report = json.loads((folder / "safe_lora.json").read_text())
        models[name] = folder / COMBINED_DIR
        settings[name] = {"defence": "safe_lora", "threshold": t, "share_projected": report["share_projected"],
                          "delta_norm_kept": report["delta_norm_kept"]}
    for lam in args.lams:
        name = f"asft_lam{_fmt(lam)}"
        folder = fit_asft(lam, run / "arms" / "asft.yaml", list(((pipe.get("arms") or {}).get("asft") or {})
                                                                .get("overrides") or []),
                          base_model, refusal_dir, directions, out / name, list(pipe.get("fit_overrides") or []))
        models[name] = folder / COMBINED_DIR
        settings[name] = {"defence": "asft", "lam": lam, "adapter": str(folder)}

    nll_path = out / "heldout_nll.json"
    nll = json.loads(nll_path.read_text()) if nll_path.exists() else {}
    todo = {k: str(v) for k, v in models.items() if k not in nll}
    if todo:
        print(f"[sweep] held-out NLL of {len(todo)} models", flush=True)
        nll.update(heldout_nll(base_model, todo, red_data=vanilla_cfg["data"], blue_data=refusal_cfg["data"],
                               max_pairs=args.nll_max_pairs))
        atomic_write_text(nll_path, json.dumps(nll, indent=2) + "\n")  # the resume cache: never half written

    from refusal_lightning.evaluation.client import GenerationSettings
    from refusal_lightning.evaluation.judges import JudgeSettings
    from refusal_lightning.evaluation.runner import evaluate

    eval_dir = out / "eval"
    with ServerProcess(base_model, models, out / "serve.log", max_batch_size=128) as server:
        evaluate(endpoint=[f"{m}={server.url}#{m}" for m in models], output_dir=str(eval_dir),
                 prompts=f"{PROXY}/validation_sorry_proxy.jsonl",
                 benign_prompts=f"{PROXY}/validation_benign_proxy.jsonl", judge=JudgeSettings("keyword"),
                 generation=GenerationSettings(temperature=0.0, max_tokens=24), concurrency=128, progress=True)
    summary = json.loads((eval_dir / "summary.json").read_text())

    rows = []
    for name in models:
        sets = summary["endpoints"][name]["prompt_sets"]
        row = {"model": name, **settings.get(name, {}), "red_nll": nll[name]["red_heldout"]}
        for key, prompt_set in (("refusal", "sorry_bench"), ("over_refusal", "benign")):
            stats = sets[prompt_set]
            row[key] = stats["refusal_rate"]
            row[f"{key}_ci"] = [stats["ci_low"], stats["ci_high"]]
            row[f"{key}_n"] = stats["n"]
        rows.append(row)
    result = {"validation": {"prompts": f"{PROXY}/validation_sorry_proxy.jsonl",
                             "benign_prompts": f"{PROXY}/validation_benign_proxy.jsonl"},
              "nll_max_pairs": args.nll_max_pairs, "rows": rows, "wall_s": round(time.time() - started, 1)}
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=2) + "\n")
    table = sweep_table(rows)
    atomic_write_text(out / "sweep.md", "# Baseline sweeps on the validation split\n\n" + table + "\n")
    print("\n" + table + f"\n\nwrote {out / 'sweep.json'} and {out / 'sweep.md'}")


def sweep_table(rows: list[dict]) -> str:
    """Markdown: one row per model, validation refusal and over-refusal with 95% Wilson CIs, red NLL."""

    def rate(row: dict, key: str) -> str:
        return f"{100 * row[key]:.0f}% {interval(*row[f'{key}_ci'], decimals=0)}"

    lines = ["| model | setting | validation refusal | validation over-refusal | red NLL | projected / kept |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        setting = (f"threshold {row['threshold']:g}" if "threshold" in row
                   else f"lam {row['lam']:g}" if "lam" in row else "")
        kept = (f"{100 * row['share_projected']:.0f}% / {100 * row['delta_norm_kept']:.0f}%"
                if "share_projected" in row else "")
        lines.append(f"| {row['model']} | {setting} | {rate(row, 'refusal')} | {rate(row, 'over_refusal')} | "
                     f"{row['red_nll']:.3f} | {kept} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
