"""The vLLM flags of the real run: shapes, memory arithmetic, and the flags each card gets."""

from __future__ import annotations

import pytest

from refusal_lightning.serving.vllm_plan import (
    CARDS,
    JUDGE_MODEL,
    KNOWN_CONFIGS,
    MAX_MODEL_LEN,
    ModelShape,
    ServerPlan,
    plan_servers,
)

QWEN = ModelShape.from_config(KNOWN_CONFIGS["Qwen/Qwen3-0.6B"])
JUDGE = ModelShape.from_config(KNOWN_CONFIGS[JUDGE_MODEL])
ADAPTERS = {"refusal": "a/refusal_lora", "vanilla": "a/attack_vanilla/combined",
            "orthogonal": "a/attack_orthogonal/combined"}


def test_shapes_give_the_published_sizes():
    assert round(QWEN.params / 1e6) == 596  # Qwen3-0.6B: 0.6B with tied embeddings
    assert round(JUDGE.params / 1e9, 2) == 7.24  # Mistral-7B-v0.2
    assert QWEN.kv_bytes_per_token == 2 * 28 * 8 * 128 * 2 and JUDGE.kv_bytes_per_token == 128 * 1024


@pytest.mark.parametrize("card_gb", sorted(CARDS))
def test_every_card_fits_both_servers_with_room_left(card_gb):
    policy, judge = plan_servers(card_gb, "Qwen/Qwen3-0.6B", QWEN, ADAPTERS, adapter_rank=16)
    assert policy.fits and judge.fits  # each KV cache holds at least one 4096-token sequence
    assert policy.utilization + judge.utilization <= 0.9  # the rest: the two CUDA contexts
    assert judge.kv_tokens >= MAX_MODEL_LEN
    for plan in (policy, judge):
        argv = plan.argv()
        assert argv[argv.index("--max-model-len") + 1] == "4096" and argv[argv.index("--dtype") + 1] == "bfloat16"
        assert argv[argv.index("--generation-config") + 1] == "vllm"
        assert ("--enforce-eager" in argv) == (card_gb == 24)
        assert "not run here" in plan.arithmetic()
    argv = policy.argv()
    assert argv[argv.index("--max-loras") + 1] == "3" and argv[argv.index("--max-lora-rank") + 1] == "16"
    assert argv[argv.index("--lora-modules") + 1:] == [f"{k}={v}" for k, v in ADAPTERS.items()]
    assert "--enable-lora" not in judge.argv()


def test_rank_is_raised_to_an_allowed_value_and_a_small_share_does_not_fit():
    policy, judge = plan_servers(24, "Qwen/Qwen3-0.6B", QWEN, ADAPTERS, adapter_rank=12)
    assert policy.max_lora_rank == 16
    starved = ServerPlan(**{**judge.__dict__, "utilization": 0.6})  # 13.5 GiB: less than the judge's weights
    assert not starved.fits and "does NOT fit" in starved.arithmetic()
    with pytest.raises(ValueError, match="choose one of"):
        plan_servers(16, "Qwen/Qwen3-0.6B", QWEN, ADAPTERS, adapter_rank=16)
