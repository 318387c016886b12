"""Shared fixtures: a tiny Qwen3 model built in-process (never downloaded) and config writers."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from refusal_lightning.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen3", seed=0)


def make_random_adapter(model_dir: Path, out: Path, seed: int,
                        targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")) -> Path:
    """A rank-4 LoRA on the tiny model with lora_B perturbed (PEFT starts it at 0), so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    model.save_pretrained(out)
    return out


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def write_fit_config(tmp_path: Path, model_dir: Path, name: str = "run", base: str = "configs/tiny/refusal_lora.yaml",
                     **overrides) -> Path:
    """A copy of a shipped demo config with every output under tmp_path and ``overrides`` merged in."""
    config = yaml.safe_load((REPO / base).read_text())
    run = tmp_path / name
    config = deep_merge(config, {
        "trainer": {
            "logger": {"init_args": {"save_dir": str(run / "tensorboard")}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(run / "adapter" / "checkpoints"), "save_last": True,
                                         "every_n_train_steps": overrides.pop("ckpt_every", 40)}}],
            "enable_progress_bar": False,
        },
        "model": {"model_name_or_path": str(model_dir), "output_dir": str(run / "adapter")},
    })
    config = deep_merge(config, overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_module(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """``python -m refusal_lightning ARGS`` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "refusal_lightning", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
