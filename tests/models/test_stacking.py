"""The attacks are evaluated as the models they were trained as: base + refusal + attack.

``combine_adapters`` folds the frozen refusal LoRA and the attack LoRA into one adapter for the plain base;
``stack_frozen_adapters`` is the training-time model. Both must equal base + merged refusal + attack.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_random_adapter

from refusal_lightning.models.stacking import StackingError, combine_adapters, read_adapter


def _base(model_dir: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    refusal = make_random_adapter(tiny_model_dir, tmp / "refusal", seed=1)  # q, v, down; r=4
    attack = make_random_adapter(tiny_model_dir, tmp / "attack", seed=2, targets=("q_proj", "k_proj", "o_proj"))
    config = json.loads((attack / "adapter_config.json").read_text())
    config.update(r=4, lora_alpha=3.0, use_rslora=True)  # a different scale rule must fold in as well
    (attack / "adapter_config.json").write_text(json.dumps(config))
    return tmp, refusal, attack


def test_combined_adapter_equals_base_plus_merged_refusal_plus_attack(tiny_model_dir, adapters):
    from peft import PeftModel

    tmp, refusal, attack = adapters
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = PeftModel.from_pretrained(_base(tiny_model_dir), str(refusal)).merge_and_unload()
    merged = PeftModel.from_pretrained(merged, str(attack)).merge_and_unload()
    combined = combine_adapters([refusal, attack], tmp / "combined")
    served = PeftModel.from_pretrained(_base(tiny_model_dir), str(combined)).eval()
    assert _rel(_logits(served, ids), _logits(merged, ids)) < 1e-4
    # and it is not trivially equal: the attack changes the logits
    refusal_only = PeftModel.from_pretrained(_base(tiny_model_dir), str(refusal)).eval()
    assert _rel(_logits(refusal_only, ids), _logits(merged, ids)) > 1e-3
    config = json.loads((combined / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and not config["use_rslora"]
    assert sorted(config["target_modules"]) == sorted({"q_proj", "v_proj", "down_proj", "k_proj", "o_proj"})


def test_training_time_model_matches_evaluated_model_in_bf16(tiny_model_dir, adapters):
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict

    from refusal_lightning.train.module import stack_frozen_adapters

    tmp, refusal, attack = adapters
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    _, factors = read_adapter(attack)
    config = json.loads((attack / "adapter_config.json").read_text())
    lora = LoraConfig(r=4, lora_alpha=3.0, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"],
                      lora_dropout=0.3)
    trained = stack_frozen_adapters(_base(tiny_model_dir, torch.bfloat16), [str(refusal)], lora)
    from safetensors.torch import load_file

    set_peft_model_state_dict(trained, load_file(str(attack / "adapter_model.safetensors")), adapter_name="default")
    trained.eval()
    assert config["lora_alpha"] == 3.0 and factors
    # frozen refusal: no gradient, no dropout; the attack LoRA alone trains
    trainable = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    combined = combine_adapters([refusal, attack], tmp / "combined_bf16")
    evaluated = PeftModel.from_pretrained(_base(tiny_model_dir, torch.bfloat16), str(combined)).eval()
    assert _rel(_logits(trained, ids), _logits(evaluated, ids)) < 1e-2


def test_combine_rejects_mismatched_or_foreign_adapters(tmp_path, adapters):
    _, refusal, _ = adapters
    with pytest.raises(StackingError, match="not a PEFT adapter folder"):
        combine_adapters([refusal, tmp_path], tmp_path / "out")
    bad = tmp_path / "dora"
    bad.mkdir()
    for f in refusal.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(StackingError, match="use_dora"):
        combine_adapters([refusal, bad], tmp_path / "out")


def test_merge_adapters_must_be_the_adapter_the_directions_came_from(tiny_model_dir, adapters, tmp_path):
    from refusal_lightning.defences.directions import DirectionsError, directions
    from refusal_lightning.defences.projection import ProjectionConfig
    from refusal_lightning.train.module import LoRASettings, RefusalLoRAModule

    _, refusal, _ = adapters
    dirs = directions(str(refusal), str(tmp_path / "dirs.pt"), base_model_name=str(tiny_model_dir))
    other = make_random_adapter(tiny_model_dir, tmp_path / "other", seed=5)

    def build(frozen: Path) -> RefusalLoRAModule:
        return RefusalLoRAModule(model_name_or_path=str(tiny_model_dir), output_dir=str(tmp_path / "out"),
                                 merge_adapters=[str(frozen)],
                                 lora=LoRASettings(target_modules=["q_proj", "v_proj", "down_proj"]),
                                 projection=ProjectionConfig(enabled=True, directions_path=dirs))

    with pytest.raises(DirectionsError, match="does not hold the adapter the directions were computed from"):
        build(other)
    module = build(refusal)
    assert module.projector is not None and module.frozen_adapters == [str(refusal)]


@pytest.mark.parametrize(("rank", "flag"), [(1, 1), (2, 8), (8, 8), (9, 16), (16, 16), (17, 32), (300, 320),
                                            (512, 512)])
def test_vllm_max_lora_rank_is_the_next_value_vllm_accepts(rank, flag):
    from refusal_lightning.models.stacking import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank

    assert vllm_max_lora_rank(rank) == flag and flag in VLLM_MAX_LORA_RANKS


def test_vllm_max_lora_rank_refuses_a_rank_vllm_cannot_serve():
    from refusal_lightning.models.stacking import vllm_max_lora_rank

    with pytest.raises(StackingError, match="above vLLM's largest --max-lora-rank"):
        vllm_max_lora_rank(513)


def test_combine_prints_the_max_lora_rank_to_serve_it_with(tiny_model_dir, adapters, tmp_path, capsys):
    from refusal_lightning.models.stacking import combine

    _, refusal, attack = adapters  # ranks 4 + 4: rank 8 is served with --max-lora-rank 8
    combine([str(refusal), str(attack)], str(tmp_path / "combined"))
    out = capsys.readouterr().out
    assert "(rank 8, scale 1)" in out and "serve it with vLLM: --max-lora-rank 8" in out
    third = make_random_adapter(tiny_model_dir, tmp_path / "third", seed=3)
    combine([str(refusal), str(attack), str(third)], str(tmp_path / "combined3"))  # 12 -> 16
    assert "serve it with vLLM: --max-lora-rank 16" in capsys.readouterr().out
