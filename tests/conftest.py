"""Shared fixtures: a tiny Qwen3 model built in-process (never downloaded) and config writers."""

from __future__ import annotations

import copy
import json
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
    from refusal_lightning.models.tiny import save_tiny_model

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


def tiny_pipeline_config() -> dict:
    """configs/tiny/pipeline.yaml with its fit configs as absolute paths, for a run in a temporary folder."""
    config = yaml.safe_load((REPO / "configs/tiny/pipeline.yaml").read_text())
    for key in ("refusal_config", "attack_config"):
        config[key] = str(REPO / config[key])
    return config


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


# A fit given ``--trainer.callbacks+=<module>.CrashAfter --trainer.callbacks.step=N`` dies like SIGKILL
# (exit 9, no cleanup, on every rank) once optimizer step N is done: the resume tests' interruption.
CRASH_CALLBACK = '''
import os
import lightning as L

class CrashAfter(L.Callback):
    """Dies like SIGKILL (no cleanup) once the given optimizer step is done."""
    def __init__(self, step: int):
        self.step = step
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            os._exit(9)
'''


def callback_env(folder: Path, module: str, source: str) -> dict[str, str]:
    """Write ``source`` as ``folder/<module>.py``; the env under which a fit subprocess can import it."""
    (folder / f"{module}.py").write_text(source)
    return {"PYTHONPATH": os.pathsep.join([str(folder), *sys.path])}


def assert_same_adapter(a_dir: Path, b_dir: Path) -> None:
    """Two saved adapters hold the same tensors (to float rounding): an interrupted run resumed exactly."""
    import torch
    from safetensors.torch import load_file

    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


@pytest.fixture
def stub():
    """Start stub OpenAI-compatible servers: ``stub(StubConfig(...)) -> (url, request log)``; all stopped after."""
    from refusal_lightning.evaluation.stub_server import start_stub

    servers = []

    def start(config):
        server, url, log = start_stub(config)
        servers.append(server)
        return url, log

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
