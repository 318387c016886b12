"""``scripts/bench_train.py``'s command line and the run it drives: build, time, probe memory, report."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.harness import Runner, Timings, log, paired_ratio, run_interleaved, summarise
from bench.memory import held_tensor_elements, probe_main, probe_memory
from bench.presets import CLIP, LOG_EVERY, LORA_ALPHA, LORA_DROPOUT, LORA_R, LR, PRESETS, THREAD, Preset, resolve_preset
from bench.report import machine_info, markdown, memory_ratios, missing_figures, quotient, ratios_of
from bench.runners import ALL_RUNNERS, BASIC_RUNNERS, EXTRA_RUNNERS, Common, make_runner, trl_version
from bench.targets import targets_of
from bench.workload import BenchData, build_base_model, build_data, make_directions

DESCRIPTION = "Training throughput: a plain PyTorch + PEFT loop vs. our LightningModule vs. each projection vs. TRL."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench/train.json"), help="JSON result file")
    ap.add_argument("--md", type=Path, default=None, help="markdown table (default: --out with .md)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per runner (preset default)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per runner first (preset default)")
    ap.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    ap.add_argument("--seq", type=int, default=None, help="override the preset's sequence length")
    ap.add_argument("--steps-per-round", type=int, default=None, help="steps per runner per interleaved round")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop the timed rounds early once this many seconds are spent (preset default)")
    ap.add_argument("--runners", default=None,
                    help=f"comma-separated subset of {','.join(ALL_RUNNERS + EXTRA_RUNNERS)} (default: the preset's; "
                    "cpu-vocab: plain,vanilla,trl; others: all but vanilla_full)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model in every runner (plain; our module's compile key; TRL's "
                    "torch_compile)")
    ap.add_argument("--mem", choices=("probe", "inproc", "off"), default="probe",
                    help="peak memory: one subprocess per runner (probe), in this process (inproc), or none")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps each memory probe trains")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda for GPU presets when available)")
    ap.add_argument("--workdir", type=Path, default=None, help="model/adapter scratch folder (default: temporary)")
    ap.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import lightning  # noqa: F401 - it sets its loggers' levels on import; quiet them after that

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "trl", "peft", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@dataclass
class Plan:
    """The run the options ask for: preset (with overrides), device, step counts and runners."""

    preset: Preset
    device: torch.device
    warmup: int
    steps: int
    per_round: int
    budget_s: float
    wanted: list[str]


def _plan(args: argparse.Namespace) -> Plan:
    preset = resolve_preset(args.preset, args.batch, args.seq)
    device = torch.device(args.device or ("cuda" if preset.gpu and torch.cuda.is_available() else "cpu"))
    if preset.gpu and device.type != "cuda":
        log(f"preset {args.preset} is meant for a GPU; running it on {device} in bf16 will be very slow")
    warmup = preset.warmup if args.warmup is None else args.warmup
    steps = preset.steps if args.steps is None else args.steps
    per_round = preset.steps_per_round if args.steps_per_round is None else args.steps_per_round
    if steps < 1 or warmup < 0 or per_round < 1:
        raise SystemExit("--steps and --steps-per-round must be >= 1, --warmup >= 0")
    if args.runners is None:
        wanted = list(preset.runners or ALL_RUNNERS)
    else:
        wanted = [n.strip() for n in args.runners.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(ALL_RUNNERS + EXTRA_RUNNERS))
    if unknown:
        raise SystemExit(f"unknown runners {unknown}; choose from {', '.join(ALL_RUNNERS + EXTRA_RUNNERS)}")
    budget_s = preset.budget_s if args.budget_s is None else args.budget_s
    return Plan(preset, device, warmup, steps, per_round, budget_s, wanted)


def _workdir(path: Path | None) -> contextlib.AbstractContextManager[str]:
    """``path`` (made if missing, kept afterwards), or a temporary folder removed at the end."""
    if path is None:
        return tempfile.TemporaryDirectory(prefix="bench_train-")
    path.mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext(str(path))


def _prepare(plan: Plan, args: argparse.Namespace, workdir: Path) -> tuple[Common, dict[str, str]]:
    """The shared model, data and directions file; runners that cannot run, with why."""
    skipped: dict[str, str] = {}
    total = plan.warmup + plan.steps
    log(f"preset {args.preset} on {plan.device}: building model and data in {workdir}")
    model_dir = build_base_model(plan.preset, workdir / "model", plan.device)
    data = build_data(model_dir, plan.preset, total * plan.preset.batch)
    directions_path = None
    if any(n not in BASIC_RUNNERS for n in plan.wanted):
        try:
            directions_path = make_directions(model_dir, workdir, plan.preset.dtype)
        except Exception as exc:  # noqa: BLE001 - projection code missing/broken: report, measure the rest
            for n in plan.wanted:
                if n not in BASIC_RUNNERS:
                    skipped[n] = f"directions could not be made: {type(exc).__name__}: {exc}"
    if "trl" in plan.wanted and trl_version() is None:
        skipped["trl"] = "trl is not importable (pip install -c constraints.txt 'refusal_lightning[bench]')"
    common = Common(plan.preset, model_dir, workdir, data, plan.device, total, directions_path, compile=args.compile)
    return common, skipped


def _build_runners(wanted: list[str], common: Common, skipped: dict[str, str]) -> list[Runner]:
    """Every wanted runner that builds, its thread parked before its first step; failures go to ``skipped``."""
    runners: list[Runner] = []
    for name in wanted:
        if name in skipped:
            continue
        torch.manual_seed(0)  # the same LoRA init everywhere
        try:
            runner = make_runner(name, common)
            runner.start()
        except Exception as exc:  # noqa: BLE001 - one broken runner must not hide the others' numbers
            skipped[name] = f"{type(exc).__name__}: {exc}"
            log(f"runner {name} skipped: {skipped[name]}")
            continue
        runners.append(runner)
        log(f"runner {name} ready ({runner.lora_params:,} LoRA parameters)")
    for name, why in skipped.items():
        log(f"SKIPPED {name}: {why}")
    if not runners:
        raise SystemExit("no runner could be built")
    return runners


@dataclass
class Measured:
    """What the timed rounds gave: per-step timings, in-process memory peaks, seconds and load averages."""

    timings: Timings
    inproc_mem: dict[str, float]
    timing_s: float
    load_before_after: list[float]


def _time(runners: list[Runner], plan: Plan, inproc_mem: bool) -> Measured:
    """The interleaved rounds, then every runner thread stopped."""
    # Setup objects (models, modules, tokenizers) move to the permanent GC generation, so the collector's
    # full passes during the timed steps do not walk every runner's object graph.
    gc.collect()
    gc.freeze()
    load_before = os.getloadavg()
    t_timing = time.perf_counter()
    timings, inproc = run_interleaved(runners, plan.warmup, plan.steps, plan.per_round, plan.device, inproc_mem,
                                      plan.budget_s)
    timing_s = time.perf_counter() - t_timing
    load_after = os.getloadavg()
    for r in runners:
        r.baton.finish(r.thread)
    gc.unfreeze()
    return Measured(timings, inproc, timing_s, [load_before[0], load_after[0]])


def _runs(runners: list[Runner], measured: Measured, tokens_per_step: int, mem: str) -> dict[str, dict[str, Any]]:
    """Per runner: step statistics, throughput vs vanilla, LoRA size, and the in-process peak if measured."""
    wall, cpu = measured.timings.wall, measured.timings.cpu
    runs: dict[str, dict[str, Any]] = {}
    for r in runners:
        runs[r.name] = {**summarise(wall[r.name], cpu[r.name], tokens_per_step),
                        "vs_vanilla": paired_ratio(wall, r.name, "vanilla"),
                        "peak_rss_mb": None, "lora_params": r.lora_params}
        if mem == "inproc":
            runs[r.name]["peak_rss_mb"] = measured.inproc_mem[r.name]
    return runs


def _add_probed_memory(runs: dict[str, dict[str, Any]], args: argparse.Namespace, workdir: Path,
                       device: torch.device) -> None:
    log("memory pass: one subprocess per runner")
    for name, res in probe_memory(list(runs), args, workdir, device).items():
        runs[name]["peak_rss_mb"] = res.get("peak_rss_mb")
        if "error" in res:
            runs[name]["peak_mem_error"] = res["error"]
        else:
            runs[name]["peak_rss_above_imports_mb"] = res["peak_above_imports_mb"]
        if "peak_cuda_mb" in res:
            runs[name]["peak_cuda_mb"] = res["peak_cuda_mb"]


def _peak_source(mem: str, device: torch.device) -> str:
    return {"probe": ("one subprocess per runner; peak RSS (VmHWM), libraries included"
                      + ("; peak_cuda_mb: torch.cuda.max_memory_allocated" if device.type == "cuda" else "")),
            "inproc": "in-process peak above the memory held when the runner's round started",
            "off": "not measured (--mem off)"}[mem]


def _settings(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    return {**asdict(plan.preset), "warmup": plan.warmup, "steps": plan.steps, "steps_per_round": plan.per_round,
            "runners": plan.wanted, "compile": args.compile,
            "precision": "bf16-mixed (bf16 base, fp32 LoRA)" if plan.preset.gpu else "fp32",
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "targets": "all linear"},
            "optimizer": f"AdamW lr={LR} wd=0 (unfused), constant LR, grad clip {CLIP}",
            "log_every_n_steps": LOG_EVERY, "data_thread": THREAD}


def _record(args: argparse.Namespace, argv: list[str] | None, plan: Plan, data: BenchData,
            runs: dict[str, dict[str, Any]], measured: Measured, skipped: dict[str, str],
            ratio_by_run: dict[str, float], tokens_per_step: int, t_start: float) -> dict[str, Any]:
    """The JSON record (docs/benchmarks.md, "JSON contract"), targets included."""
    ratios = ratios_of(measured.timings.wall)
    missing, peak_rss = missing_figures(plan.wanted, skipped, runs, ratios, args.mem)
    result: dict[str, Any] = {
        "preset": args.preset,
        "machine": machine_info(plan.device),
        "runs": runs,
        "ratios": ratios,
        "ratio_method": "median over interleaved rounds of the paired ratio time(reference) / time(runner)",
        "ratios_of_medians": {k: quotient(runs, k) for k in ratios},
        "peak_rss_mb": peak_rss,
        "mem_ratios": memory_ratios(runs),
        "missing": missing,
        "ratios_cpu_time": ratios_of(measured.timings.cpu),
        "padding_efficiency": data.padding[THREAD]["grouped"],
        "directions_mem_ratio": max(ratio_by_run.values()) if ratio_by_run else None,
        "directions_mem_ratio_by_run": ratio_by_run,
        "padding": data.padding,
        "skipped": skipped,
        "peak_mem_source": _peak_source(args.mem, plan.device),
        "tokens_per_step": tokens_per_step,
        "settings": _settings(plan, args),
        "command": "python scripts/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "timing_s": measured.timing_s,
        "rounds": measured.timings.rounds,
        "stopped_by_budget": measured.timings.stopped_by_budget,
        "loadavg_1min_before_after": measured.load_before_after,
        "wall_s": time.perf_counter() - t_start,
    }
    result["targets"] = targets_of(result)
    return result


def _write(result: dict[str, Any], out: Path, md: Path | None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md_path = md or out.with_suffix(".md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    md_path.write_text(text)
    log(f"wrote {out} and {md_path} in {result['wall_s']:.0f} s")
    print(text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark the options describe; writes ``--out`` (JSON) and ``--md``, returns the record."""
    args = parse_args(argv)
    _quiet_libraries()
    if args._probe:
        probe_main(args)
        return {}
    t_start = time.perf_counter()
    plan = _plan(args)
    with _workdir(args.workdir) as folder:
        workdir = Path(folder)
        common, skipped = _prepare(plan, args, workdir)
        tokens_per_step = plan.preset.batch * plan.preset.seq
        runners = _build_runners(plan.wanted, common, skipped)
        measured = _time(runners, plan, args.mem == "inproc")
        runs = _runs(runners, measured, tokens_per_step, args.mem)
        ratio_by_run = {r.name: held_tensor_elements(r.projector) / r.lora_params
                        for r in runners if r.projector is not None}
        del runners
        gc.collect()
        if args.mem == "probe":
            _add_probed_memory(runs, args, workdir, plan.device)
        result = _record(args, argv, plan, common.data, runs, measured, skipped, ratio_by_run, tokens_per_step,
                         t_start)
        _write(result, args.out, args.md)
    return result
