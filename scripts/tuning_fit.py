"""One fit of a config dict for the validation-split tuning scripts (``tune_retain.py``, ``tune_act_guard.py``):
its outputs, logger and checkpoints moved under the tuning folder, the config written beside them, and the fit
run as the command line runs it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run_fit(cfg: dict, folder: Path, out: Path, label: str) -> None:
    """Fit ``cfg`` into ``folder`` (TensorBoard under ``out/tensorboard/<folder name>``, the config in
    ``out/<folder name>.yaml``); ``label`` names the fit in the timing line."""
    cfg["model"]["output_dir"] = str(folder)
    cfg["trainer"]["logger"]["init_args"].update(save_dir=str(out / "tensorboard"), name=folder.name)
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(folder / "checkpoints")
    path = out / f"{folder.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    started = time.time()
    subprocess.run([sys.executable, "-m", "refusal_lightning", "fit", "--config", str(path)], check=True, cwd=REPO)
    print(f"[tune] {label}: fit in {time.time() - started:.0f}s", flush=True)
