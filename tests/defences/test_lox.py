"""LoX: the extrapolation adapter equals its dense formula, ``k = r`` scales the refusal update, bad settings
fail in one message, and the attack's starting model is base + refusal + extrapolation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_random_adapter

from refusal_lightning.defences.lox import LOX_DIR, STATS_FILE, LoxConfig, LoxError, write_lox_adapter
from refusal_lightning.models.stacking import adapter_scale, read_adapter
from refusal_lightning.train.module import LoRASettings, RefusalLoRAModule

ALPHA = 0.75
R = 4  # make_random_adapter's rank


@pytest.fixture(scope="module")
def refusals(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Random refusal LoRAs (B != 0) on q, v, down: PEFT's scale ``8 / 4``, and an rsLoRA one (``3 / sqrt(4)``)."""
    tmp = tmp_path_factory.mktemp("lox")
    plain = make_random_adapter(tiny_model_dir, tmp / "refusal", seed=1)
    rslora = make_random_adapter(tiny_model_dir, tmp / "refusal_rslora", seed=2)
    config = json.loads((rslora / "adapter_config.json").read_text())
    config.update(lora_alpha=3.0, use_rslora=True)
    (rslora / "adapter_config.json").write_text(json.dumps(config))
    return {"plain": plain, "rslora": rslora}


def _base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _stacked(model_dir: Path, *adapters: Path):
    """The base with each adapter merged in turn, as PEFT applies it."""
    from peft import PeftModel

    model = _base(model_dir)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


def _dense_updates(adapter: Path) -> dict[str, torch.Tensor]:
    """``dW_r = s B A`` per module, materialised (float64)."""
    config, factors = read_adapter(adapter)
    return {m: adapter_scale(config, m) * b.double() @ a.double() for m, (a, b) in factors.items()}


def _truncated(dw: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def _weight_key(module: str) -> str:
    return module.removeprefix("base_model.model.") + ".weight"


@pytest.mark.parametrize(("kind", "k"), [("plain", 2), ("rslora", 1), ("plain", R)])
def test_extrapolated_weights_equal_the_dense_formula(tiny_model_dir, refusals, tmp_path, kind, k):
    refusal = refusals[kind]
    lox = write_lox_adapter(refusal, tmp_path / "lox", alpha=ALPHA, k=k)
    base = _base(tiny_model_dir).state_dict()
    got = _stacked(tiny_model_dir, refusal, lox).state_dict()
    for module, dw in _dense_updates(refusal).items():
        key = _weight_key(module)
        want = base[key].double() + dw + ALPHA * _truncated(dw, k)
        torch.testing.assert_close(got[key].double(), want, atol=1e-5, rtol=1e-5, msg=key)
    config = json.loads((lox / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == k and not config["use_rslora"]
    assert config["target_modules"] == json.loads((refusal / "adapter_config.json").read_text())["target_modules"]


def test_full_rank_lox_scales_the_refusal_update(refusals, tmp_path):
    refusal = refusals["plain"]
    lox = write_lox_adapter(refusal, tmp_path / "lox", alpha=ALPHA, k=None)  # None: k = r
    config, factors = read_adapter(lox)
    refusal_config, refusal_factors = read_adapter(refusal)
    assert config["r"] == R and factors.keys() == refusal_factors.keys()
    for module, (a, b) in factors.items():
        ra, rb = refusal_factors[module]
        torch.testing.assert_close(adapter_scale(config, module) * b @ a,
                                   ALPHA * adapter_scale(refusal_config, module) * rb @ ra, atol=1e-5, rtol=1e-5)
    stats = json.loads((lox / STATS_FILE).read_text())
    assert stats["k"] == stats["rank"] == R and stats["alpha"] == ALPHA
    assert stats["energy"] == pytest.approx(1.0)


def test_stats_give_the_energy_the_top_k_keep_and_a_second_call_writes_the_same_bytes(refusals, tmp_path):
    refusal = refusals["plain"]
    out = write_lox_adapter(refusal, tmp_path / "lox", alpha=ALPHA, k=1)
    stats = json.loads((out / STATS_FILE).read_text())
    dense = _dense_updates(refusal)
    for module, dw in dense.items():
        s = torch.linalg.svdvals(dw)
        assert stats["modules"][module]["energy"] == pytest.approx(float(s[0] ** 2 / (s ** 2).sum()), rel=1e-4)
    kept = sum(float(torch.linalg.svdvals(dw)[0] ** 2) for dw in dense.values())
    assert stats["energy"] == pytest.approx(kept / sum(float(dw.square().sum()) for dw in dense.values()), rel=1e-4)
    assert 0 < stats["energy"] < 1
    first = {f.name: f.read_bytes() for f in out.iterdir()}
    write_lox_adapter(refusal, out, alpha=ALPHA, k=1)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == first
    assert sorted(first) == ["adapter_config.json", "adapter_model.safetensors", STATS_FILE]


@pytest.mark.parametrize("k", [0, R + 1])
def test_k_out_of_range_is_refused_naming_k(refusals, tmp_path, k):
    with pytest.raises(LoxError, match=rf"lox\.k = {k}"):
        write_lox_adapter(refusals["plain"], tmp_path / "lox", alpha=ALPHA, k=k)
    assert not (tmp_path / "lox").exists()


def test_a_missing_refusal_adapter_is_refused(tmp_path):
    with pytest.raises(LoxError, match="refusal adapter cannot be read"):
        write_lox_adapter(tmp_path / "nowhere", tmp_path / "lox", alpha=ALPHA, k=1)


def test_lox_without_merge_adapters_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(LoxError, match="merge_adapters"):
        RefusalLoRAModule(model_name_or_path=str(tmp_path / "no-model"), output_dir=str(tmp_path / "out"),
                          lox=LoxConfig(enabled=True))


def test_attack_starts_from_base_plus_refusal_plus_extrapolation(tiny_model_dir, refusals, tmp_path):
    refusal = refusals["plain"]
    torch.manual_seed(0)
    module = RefusalLoRAModule(
        model_name_or_path=str(tiny_model_dir), output_dir=str(tmp_path / "attack"), merge_adapters=[str(refusal)],
        lora=LoRASettings(r=2, alpha=4.0, dropout=0.0, target_modules=["q_proj", "k_proj"]),
        lox=LoxConfig(enabled=True, alpha=ALPHA, k=2),
    )
    lox = tmp_path / "attack" / LOX_DIR
    assert module.frozen_adapters == [str(refusal), str(lox)]
    assert json.loads((lox / STATS_FILE).read_text())["k"] == 2
    frozen = {n: p for n, p in module.model.named_parameters() if ".frozen_1." in n}
    assert frozen and not any(p.requires_grad for p in frozen.values())
    assert all(p.requires_grad for n, p in module.model.named_parameters() if ".default." in n)

    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    module.model.eval()
    with torch.no_grad():
        got = module.model(input_ids=ids).logits
        want = _stacked(tiny_model_dir, refusal, lox)(input_ids=ids).logits
        without = _stacked(tiny_model_dir, refusal)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - without).abs().max() > 1e-3  # the extrapolation changes the model
