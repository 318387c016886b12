"""Peak memory per runner, and the memory a projector's direction tensors take.

Runners sharing one process cannot be told apart by RSS, so ``peak_rss_mb`` comes from a second pass:
each runner is rebuilt alone in a fresh subprocess (``bench_train.py --_probe NAME``), trained for a few
steps, and reports its peak RSS (``VmHWM``), plus ``peak_cuda_mb`` (``torch.cuda.max_memory_allocated``)
on a GPU. Every probe imports the same libraries (TRL included) before building, so differences do not
come from imports; ``peak_rss_above_imports_mb`` subtracts what the process held before building.
``--mem inproc`` (for quick runs) instead reports the peak above the memory held when the runner's round
started (``harness.run_interleaved``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from bench.harness import peak_rss_mb, rss_mb
from bench.presets import resolve_preset
from bench.runners import Common, make_runner, trl_version
from bench.workload import build_data

ENTRY = Path(__file__).resolve().parents[1] / "bench_train.py"  # the probe subprocesses run the same script


def held_tensor_elements(obj: Any) -> int:
    """Elements of every tensor reachable from ``obj``'s attributes, each storage counted once.

    ``nn.Parameter``s (the model's own LoRA weights the projector points at) are not counted.
    """
    storages: dict[tuple, int] = {}
    seen: set[int] = set()

    def visit(x: Any) -> None:
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, torch.nn.Parameter):
            return
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            storages[(x.device, st.data_ptr())] = st.nbytes() // max(1, x.element_size())
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                visit(v)
        elif hasattr(x, "__dict__") and not isinstance(x, (type, torch.nn.Module)):
            for v in vars(x).values():
                visit(v)

    visit(obj)
    return sum(storages.values())


def probe_memory(names: list[str], args: argparse.Namespace, workdir: Path, device: torch.device
                 ) -> dict[str, dict[str, Any]]:
    """Peak memory of each runner trained alone in a fresh subprocess (see the module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> tuple[str, dict[str, Any]]:
        cmd = [sys.executable, str(ENTRY), "--preset", args.preset, "--workdir", str(workdir),
               "--_probe", name, "--device", str(device), "--steps", str(args.mem_steps)]
        cmd += ["--batch", str(args.batch)] if args.batch else []
        cmd += ["--seq", str(args.seq)] if args.seq else []
        cmd += ["--compile"] if args.compile else []
        # the probe inherits the environment cli._quiet_libraries set up for the timed runs
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            return name, {"error": (proc.stderr or proc.stdout)[-800:]}
        return name, json.loads(lines[-1])

    jobs = 1 if device.type == "cuda" else max(1, min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, names))


def probe_main(args: argparse.Namespace) -> None:
    """``--_probe NAME``: build one runner alone, train ``--steps`` steps, print its peak memory as JSON."""
    import lightning  # noqa: F401 - every probe imports the same libraries before its baseline
    import peft  # noqa: F401

    if trl_version() is not None:
        import trl  # noqa: F401
    preset = resolve_preset(args.preset, args.batch, args.seq)
    device = torch.device(args.device)
    workdir = Path(args.workdir)
    steps = max(1, args.steps)
    data = build_data(workdir / "model", preset, steps * preset.batch)
    directions_path = workdir / "refusal_param_directions.pt"
    common = Common(preset, workdir / "model", workdir / f"probe-{args._probe}", data, device, steps,
                    directions_path if directions_path.exists() else None, compile=args.compile)
    gc.collect()
    base = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    runner = make_runner(args._probe, common)
    runner.start()
    runner.baton.run(steps, runner.thread)
    peak = peak_rss_mb()
    out = {"peak_rss_mb": peak, "rss_before_build_mb": base, "peak_above_imports_mb": peak - base,
           "source": "peak RSS (VmHWM) of a process training only this runner"}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    runner.baton.finish(runner.thread)
    print(json.dumps(out), flush=True)
