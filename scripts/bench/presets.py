"""Benchmark sizes (presets) and the training settings every runner shares.

Settings that would change the math are aligned across runners, not left at each framework's default:
the same LoRA, AdamW (unfused, no weight decay), constant LR, gradient clipping 1.0 as in the shipped
configs, logging every 10 steps, and gradient accumulation 1 (so per-optimizer-step costs such as the
projection are not amortised: the projection ratios are worst-case for the shipped configs, which
accumulate 4 batches).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 16.0, 0.05
LR, CLIP = 2e-4, 1.0
LOG_EVERY = 10
THREAD = "red"  # the attack fits train on red replies
QWEN3_VOCAB = 151936


@dataclass(frozen=True)
class Preset:
    """Model shape, batch shape, precision and default step counts of one benchmark size."""

    hidden_size: int
    num_layers: int
    seq: int
    batch: int
    warmup: int
    steps: int
    steps_per_round: int
    budget_s: float  # the timed rounds stop early (after whole rounds) once this is spent
    real_shape: bool = False  # Qwen3-0.6B's exact shape (vocab 151936) instead of tiny.py's scaling
    gpu: bool = False  # bf16 base weights + bf16-mixed on CUDA
    vocab_size: int | None = None  # tiny.py's shape with this vocabulary (the tiny tokenizer's ids are a subset)
    runners: tuple[str, ...] | None = None  # the default --runners (None: every runner)

    @property
    def dtype(self) -> str:
        """The base model's weight dtype."""
        return "bfloat16" if self.gpu else "float32"


PRESETS = {
    "tiny": Preset(hidden_size=64, num_layers=2, seq=128, batch=4, warmup=2, steps=30, steps_per_round=1,
                   budget_s=60),
    "cpu-small": Preset(hidden_size=512, num_layers=4, seq=256, batch=4, warmup=3, steps=60, steps_per_round=1,
                        budget_s=330),
    # cpu-small's model at Qwen3's vocabulary: the LM head and the logits dominate time and memory.
    "cpu-vocab": Preset(hidden_size=512, num_layers=4, seq=512, batch=4, warmup=1, steps=8, steps_per_round=1,
                        budget_s=420, vocab_size=QWEN3_VOCAB, runners=("plain", "vanilla", "trl")),
    # On a GPU one-step slices would add a device sync per step and hide the host/device overlap.
    "qwen3-0.6b": Preset(hidden_size=1024, num_layers=28, seq=512, batch=4, warmup=3, steps=40, steps_per_round=5,
                         budget_s=360, real_shape=True, gpu=True),
}


def resolve_preset(name: str, batch: int | None = None, seq: int | None = None) -> Preset:
    """``PRESETS[name]`` with the batch size and sequence length overridden where given."""
    preset = PRESETS[name]
    return replace(preset, batch=batch or preset.batch, seq=seq or preset.seq)
