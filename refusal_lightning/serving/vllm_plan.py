"""The two vLLM servers of the real run on one GPU: their flags, and the memory arithmetic behind them.

The policy (Qwen3-0.6B with the evaluated adapters) and SORRY-Bench's 7B judge share one card. vLLM's
``--gpu-memory-utilization`` is a per-process budget (weights + activation peak + KV cache); with the
default 0.9 the second server finds less free memory than it asks for and refuses to start, and with the
default context lengths (40,960 for Qwen3, 32,768 for the judge) the KV cache must hold one whole
sequence of that length. So each server gets a share of the card, ``--max-model-len 4096`` (the
longest request here: a judge prompt quoting a 1,024-token answer, about 1.5k tokens) and bf16 weights
(the judge checkpoint is fp32: 29 GB as stored). The judge starts once the policy server answers, so
each process measures the free memory the other left.

The arithmetic is an estimate from the models' shapes, not a measurement: weights and LoRA slots are
exact sizes; ``RUNTIME_GIB`` (activation peak, sampler, CUDA context, and CUDA graphs unless
``--enforce-eager``) is an assumption. None of these flag sets was run here (no GPU); ``preflight``
prints them for the configured card.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from refusal_lightning.models.stacking import vllm_max_lora_rank

GIB = 1024**3
MAX_MODEL_LEN = 4096
BF16_BYTES = 2
JUDGE_MODEL = "sorry-bench/ft-mistral-7b-instruct-v0.2-sorry-bench-202406"

# config.json fields of the real tier's two models (Hub, 2025), used when the config cannot be read.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-0.6B": {"hidden_size": 1024, "num_hidden_layers": 28, "intermediate_size": 3072,
                        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                        "vocab_size": 151936, "tie_word_embeddings": True},
    JUDGE_MODEL: {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32000,
                  "tie_word_embeddings": False},
}


@dataclass(frozen=True)
class ModelShape:
    """What the memory arithmetic needs from a decoder's ``config.json``."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            return cls(hidden=hidden, layers=int(config["num_hidden_layers"]),
                       intermediate=int(config["intermediate_size"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
                       tied=bool(config.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"config.json lacks a decoder shape field: {err}") from None

    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer: q, k, v, o, gate, up, down."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(self.hidden, q), (self.hidden, kv), (self.hidden, kv), (q, self.hidden),
                (self.hidden, self.intermediate), (self.hidden, self.intermediate), (self.intermediate, self.hidden)]

    @property
    def params(self) -> int:
        per_layer = sum(i * o for i, o in self.linear_shapes)
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2)

    def lora_params(self, rank: int) -> int:
        """Parameters of a rank-``rank`` LoRA on every linear layer (what vLLM reserves per adapter slot)."""
        return self.layers * sum(rank * (i + o) for i, o in self.linear_shapes)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * BF16_BYTES  # K and V, bf16


@dataclass(frozen=True)
class Card:
    name: str
    gib: float  # what the driver reports, the smallest card of the class


CARDS = {24: Card("24 GB (L4, A10G, RTX 4090)", 22.5), 40: Card("40 GB (A100 40GB)", 39.5),
         80: Card("80 GB (A100/H100 80GB)", 79.2)}
# (policy, judge) --gpu-memory-utilization per card; the rest stays free for the two CUDA contexts.
SHARES = {24: (0.18, 0.72), 40: (0.20, 0.65), 80: (0.20, 0.60)}
# Assumed activation peak + sampler + CUDA context per server (GiB), eager / with CUDA graphs.
RUNTIME_GIB = {"policy": (1.0, 1.5), "judge": (1.5, 2.5)}


@dataclass(frozen=True)
class ServerPlan:
    """One ``vllm serve`` command and the memory it should need."""

    role: str
    model: str
    port: int
    utilization: float
    card: Card
    weights_gib: float
    lora_gib: float
    runtime_gib: float
    kv_bytes_per_token: int
    enforce_eager: bool
    lora_modules: Mapping[str, str] | None = None
    max_lora_rank: int | None = None

    @property
    def budget_gib(self) -> float:
        return self.utilization * self.card.gib

    @property
    def kv_gib(self) -> float:
        return self.budget_gib - self.weights_gib - self.lora_gib - self.runtime_gib

    @property
    def kv_tokens(self) -> int:
        return max(0, int(self.kv_gib * GIB / self.kv_bytes_per_token))

    @property
    def fits(self) -> bool:
        """vLLM refuses to start when the KV cache cannot hold one ``--max-model-len`` sequence."""
        return self.kv_tokens >= MAX_MODEL_LEN

    def argv(self) -> list[str]:
        args = ["vllm", "serve", self.model, "--port", str(self.port), "--dtype", "bfloat16",
                "--max-model-len", str(MAX_MODEL_LEN), "--gpu-memory-utilization", f"{self.utilization:.2f}",
                # vLLM would otherwise fill unset sampling fields from the model's generation_config
                # (Qwen3: top_k 20, top_p 0.95); SORRY-Bench samples with vLLM's neutral defaults.
                "--generation-config", "vllm"]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.lora_modules:
            args += ["--enable-lora", "--max-loras", str(len(self.lora_modules)),
                     "--max-lora-rank", str(self.max_lora_rank), "--lora-modules",
                     *(f"{name}={path}" for name, path in self.lora_modules.items())]
        return args

    def command(self) -> str:
        return shlex.join(self.argv())

    def arithmetic(self) -> str:
        lora = f" + LoRA slots {self.lora_gib:.2f}" if self.lora_modules else ""
        verdict = "fits" if self.fits else f"does NOT fit: needs >= {MAX_MODEL_LEN} tokens of KV cache"
        return (f"{self.role} on {self.card.name}: {self.utilization:.2f} x {self.card.gib:g} GiB = "
                f"{self.budget_gib:.1f} GiB = weights {self.weights_gib:.2f}{lora} + runtime {self.runtime_gib:.1f} "
                f"(assumed) + KV cache {self.kv_gib:.2f} GiB = {self.kv_tokens:,} tokens at "
                f"{self.kv_bytes_per_token // 1024} KiB/token ({self.kv_tokens / MAX_MODEL_LEN:.1f} x "
                f"{MAX_MODEL_LEN}): {verdict} (estimate, not run here)")


def plan_servers(card_gb: int, policy_model: str, policy_shape: ModelShape, adapters: Mapping[str, str],
                 adapter_rank: int, judge_model: str = JUDGE_MODEL, judge_shape: ModelShape | None = None,
                 policy_port: int = 8000, judge_port: int = 8001) -> tuple[ServerPlan, ServerPlan]:
    """The policy and judge servers for one card of ``card_gb`` GB (24, 40 or 80).

    ``adapters`` maps served name -> adapter folder (every one is served at once: ``--max-loras`` is their
    count, so they never take turns); ``adapter_rank`` is the largest rank among them.
    """
    if card_gb not in CARDS:
        raise ValueError(f"card size {card_gb} GB: choose one of {sorted(CARDS)}")
    card = CARDS[card_gb]
    judge_shape = judge_shape or ModelShape.from_config(KNOWN_CONFIGS[JUDGE_MODEL])
    eager = card_gb == 24  # CUDA graphs cost about 0.5-1 GiB per server: the 24 GB card cannot spare it
    policy_share, judge_share = SHARES[card_gb]
    rank = vllm_max_lora_rank(adapter_rank)
    policy = ServerPlan(
        role="policy", model=policy_model, port=policy_port, utilization=policy_share, card=card,
        weights_gib=policy_shape.params * BF16_BYTES / GIB,
        lora_gib=len(adapters) * policy_shape.lora_params(rank) * BF16_BYTES / GIB,
        runtime_gib=RUNTIME_GIB["policy"][0 if eager else 1], kv_bytes_per_token=policy_shape.kv_bytes_per_token,
        enforce_eager=eager, lora_modules=dict(adapters), max_lora_rank=rank)
    judge = ServerPlan(
        role="judge", model=judge_model, port=judge_port, utilization=judge_share, card=card,
        weights_gib=judge_shape.params * BF16_BYTES / GIB, lora_gib=0.0,
        runtime_gib=RUNTIME_GIB["judge"][0 if eager else 1], kv_bytes_per_token=judge_shape.kv_bytes_per_token,
        enforce_eager=eager)
    return policy, judge


def wait_for(port: int) -> str:
    """A shell line that returns once the server on ``port`` answers (the judge must start after the policy)."""
    return f"until curl -sf http://127.0.0.1:{port}/v1/models >/dev/null; do sleep 5; done"
