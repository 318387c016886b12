"""`fit` end to end on the tiny model: adapter, TensorBoard, data stats, checkpoint size, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CRASH_CALLBACK, assert_same_adapter, callback_env, run_module, write_fit_config


def _scalars(tb_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for run in sorted(tb_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(run.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("fit")
    config = write_fit_config(tmp, tiny_model_dir, trainer={"max_steps": 30, "val_check_interval": 15},
                              ckpt_every=15)
    result = run_module("fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run", config


def test_fit_writes_loadable_adapter_with_changed_weights(fitted, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _ = fitted
    adapter = run / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "data_stats.json"):
        assert (adapter / name).exists(), name
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # PEFT initialises B to zero
    stats = json.loads((adapter / "data_stats.json").read_text())
    assert stats["pairs"] > 0 and stats["thread"] == "blue" and "refusal_score_histogram" in stats


def test_fit_logs_to_tensorboard(fitted):
    run, _ = fitted
    scalars = _scalars(run / "tensorboard")
    for tag in ("train/loss", "val/loss", "val/token_accuracy", "lr", "grad_norm", "tokens_per_s"):
        assert scalars.get(tag), f"{tag} missing from {sorted(scalars)}"
    assert scalars["train/loss"][-1] < scalars["train/loss"][0]


def test_checkpoint_holds_only_trainable_weights(fitted):
    run, _ = fitted
    ckpt = torch.load(run / "adapter" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"] and ckpt["loops"]["fit_loop"]


def test_rerun_with_existing_config_and_ckpt_path_last(fitted):
    _, config = fitted
    # Resuming a finished run is a no-op, not a crash on the saved config.yaml.
    result = run_module("fit", "--config", str(config), "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]


def test_resume_mid_epoch_matches_uninterrupted(tmp_path, tiny_model_dir):
    # 120 train pairs / batch 8 = 15 batches an epoch: checkpoint at step 10 (mid epoch 0), die at 13,
    # resume to step 20 (mid epoch 1). Dropout is 0, so the two runs must agree to float rounding.
    common = {"trainer": {"max_steps": 20, "val_check_interval": 10}, "ckpt_every": 10}
    straight = write_fit_config(tmp_path, tiny_model_dir, "straight", **common)
    assert run_module("fit", "--config", str(straight)).returncode == 0

    env = callback_env(tmp_path, "crash_cb", CRASH_CALLBACK)
    crashed = write_fit_config(tmp_path, tiny_model_dir, "crashed", **common)
    died = run_module("fit", "--config", str(crashed), "--trainer.callbacks+=crash_cb.CrashAfter",
                      "--trainer.callbacks.step=13", env=env)
    assert died.returncode == 9, died.stderr[-2000:]
    ckpt = torch.load(tmp_path / "crashed/adapter/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 10
    resumed = run_module("fit", "--config", str(crashed), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stderr + resumed.stdout
    assert_same_adapter(tmp_path / "straight/adapter", tmp_path / "crashed/adapter")
