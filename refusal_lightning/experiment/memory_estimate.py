"""GPU memory of a LoRA fit, estimated from the model's shape and the fit config (``preflight``).

An estimate, not a measurement: weights, LoRA weights and AdamW state are exact sizes; the activations
saved for the backward pass are counted per token from the layer shapes (SDPA/flash attention: no
``seq x seq`` scores are kept), and the chunked loss keeps ``loss_chunk_size x vocab`` fp32 logits at a
time. The CUDA context and allocator slack are a fixed ``RUNTIME_GIB``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from refusal_lightning.serving.vllm_plan import GIB, ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_GIB = 1.0  # CUDA context, cuBLAS workspaces, allocator fragmentation (assumed)
ADAMW_BYTES = 16  # fp32 LoRA weight + gradient + two AdamW moments, per trainable parameter
DEFAULT_RANK = 8  # LoRASettings.r
DEFAULT_CHUNK = 512  # chunked_loss.DEFAULT_CHUNK_SIZE


@dataclass(frozen=True)
class FitMemory:
    weights_gib: float
    lora_gib: float
    activations_gib: float
    logits_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.lora_gib + self.activations_gib + self.logits_gib + RUNTIME_GIB

    def describe(self) -> str:
        return (f"~{self.total_gib:.1f} GiB = weights {self.weights_gib:.2f} + LoRA and AdamW {self.lora_gib:.2f} + "
                f"activations {self.activations_gib:.2f} + loss logits {self.logits_gib:.2f} + runtime {RUNTIME_GIB:g}")


def activation_bytes_per_token(shape: ModelShape, checkpointing: bool, act_bytes: int) -> float:
    """Bytes kept for the backward pass per token, over all layers.

    Per layer (no checkpointing): the two norms' inputs and outputs (4 h), q, k, v and the attention
    output (q + 2 kv + q), the MLP's gate, up, their product and the down input (4 i), plus the fp32
    inputs LoRA's dropout keeps for each of the seven linear layers. With checkpointing only each layer's
    input (h) stays, plus one layer recomputed at a time.
    """
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    lora_inputs = 4 * sum(i for i, _ in shape.linear_shapes)
    layer = act_bytes * (4 * shape.hidden + 2 * q + 2 * kv + 4 * shape.intermediate) + lora_inputs
    if checkpointing:
        return shape.layers * act_bytes * shape.hidden + layer
    return shape.layers * layer


def fit_memory(shape: ModelShape, model_section: Mapping[str, Any], data_section: Mapping[str, Any],
               precision: str | None) -> FitMemory:
    """Peak memory of one fit, from its config's ``model:`` and ``data:`` sections and trainer precision."""
    dtype = str(model_section.get("dtype", "float32"))
    weight_bytes = DTYPE_BYTES.get(dtype, 4)
    act_bytes = 2 if precision and ("bf16" in str(precision) or "16" in str(precision)) else 4
    rank = int((model_section.get("lora") or {}).get("r", DEFAULT_RANK))
    frozen = len(model_section.get("merge_adapters") or [])  # frozen LoRAs stay fp32, unmerged
    tokens = int(data_section.get("batch_size", 1)) * int(data_section.get("max_length", 512))
    checkpointing = bool(model_section.get("gradient_checkpointing", False))
    chunk = int(model_section.get("loss_chunk_size", DEFAULT_CHUNK))
    if model_section.get("loss_impl", "chunked") == "full":
        chunk = tokens
    return FitMemory(
        weights_gib=(shape.params * weight_bytes + frozen * shape.lora_params(rank) * 4) / GIB,
        lora_gib=shape.lora_params(rank) * ADAMW_BYTES / GIB,
        activations_gib=tokens * activation_bytes_per_token(shape, checkpointing, act_bytes) / GIB,
        # logits, their softmax and its gradient, fp32, for one chunk of labelled tokens
        logits_gib=3 * min(chunk, tokens) * shape.vocab * 4 / GIB,
    )
