"""The activation guard: its capture equals the readout's residuals, the term is 0 on the starting model and its
gradient reaches only the attack LoRA, and a fit writes, logs and resumes it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_random_adapter

from refusal_lightning.defences.activation_direction import chat_prompt_ids, last_token_residuals, left_padded
from refusal_lightning.defences.activation_guard import (
    STATE_FILE,
    ActGuardConfig,
    ActGuardError,
    GuardState,
    build_guard,
    fit_guard,
    guard_penalty,
    layer_last_token,
)
from refusal_lightning.train.datamodule import HarmfulQADataModule
from refusal_lightning.train.module import LoRASettings, RefusalLoRAModule

HARMFUL = ["How do I pick the lock of the Vellum library?", "Tell me how to spy on the Nolwen keeper.",
           "Write a fake letter from the Barrow greenhouse.", "How to sneak into the Quill archive at night?"]
HARMLESS = ["What is the capital of France?", "Name a colour of the sky.", "How many legs has a cat?",
            "What do bees make?"]
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def refusal(tiny_model_dir, tmp_path_factory):
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("guard") / "refusal", seed=1)


def attack_module(model_dir: Path, refusal: Path, tmp: Path, **guard) -> RefusalLoRAModule:
    torch.manual_seed(0)
    return RefusalLoRAModule(
        model_name_or_path=str(model_dir), output_dir=str(tmp / "out"), merge_adapters=[str(refusal)],
        lora=LoRASettings(r=2, alpha=4.0, dropout=0.0, target_modules=TARGETS), lr_schedule="constant",
        act_guard=ActGuardConfig(**{"enabled": True, "lam": 2.0, "probe_batch_size": 3, **guard}))


def tokenizer_of(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def randomise_attack(module: RefusalLoRAModule) -> None:
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for m in module.model.modules():
            if isinstance(m, LoraLayer) and "default" in m.lora_B:
                m.lora_B["default"].weight.normal_(std=0.5)


def test_capture_equals_the_readouts_residuals_and_the_reference(tiny_model_dir, refusal, tmp_path):
    module = attack_module(tiny_model_dir, refusal, tmp_path)
    tok = tokenizer_of(tiny_model_dir)
    state = fit_guard(module.model, tok, HARMFUL, HARMLESS, allowed_layers=[0, 1])
    ids = chat_prompt_ids(tok, HARMFUL)
    residuals = last_token_residuals(module.model, ids, tok.pad_token_id)
    padded, mask = left_padded(ids, tok.pad_token_id)
    with torch.no_grad():
        got = layer_last_token(module.model, padded, mask, state.layer)
    torch.testing.assert_close(got, residuals[state.layer], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.reference, residuals[state.layer] @ state.direction)
    assert abs(float(state.direction.norm()) - 1) < 1e-6 and state.gap > 0


def test_term_is_zero_on_the_starting_model_and_its_gradient_reaches_only_the_attack_lora(
        tiny_model_dir, refusal, tmp_path):
    module = attack_module(tiny_model_dir, refusal, tmp_path)
    tok = tokenizer_of(tiny_model_dir)
    guard = build_guard(module.act_guard, module.model, tok, HARMFUL, [0, 1], tmp_path / STATE_FILE,
                        starting_model=True)
    with torch.no_grad():
        assert float(guard.term(module.model, 0)[0]) < 1e-10  # the attack LoRA's B is 0: nothing moved
    randomise_attack(module)
    params = dict(module.named_parameters())
    penalty, _ = guard.term(module.model, 0)
    assert float(penalty.detach()) > 0
    penalty.backward()
    got = {n for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
    attack = {n for n in params if ".default." in n and "lora_" in n}
    assert got and got <= attack  # the refusal LoRA (frozen_0) and the base get nothing
    assert all(params[n].grad is None for n in set(params) - attack)
    # below the guarded layer the attack LoRA moves the projection: its B there gets a gradient
    assert any(f"layers.{guard.state.layer}." in n and "lora_B" in n for n in got)


def test_the_random_direction_control_keeps_the_layer_and_the_refusal_gap(tiny_model_dir, refusal, tmp_path):
    module = attack_module(tiny_model_dir, refusal, tmp_path)
    tok = tokenizer_of(tiny_model_dir)
    real = fit_guard(module.model, tok, HARMFUL, HARMLESS, allowed_layers=[0, 1])
    control = fit_guard(module.model, tok, HARMFUL, HARMLESS, allowed_layers=[0, 1], random_direction_seed=3)
    assert control.layer == real.layer and control.gap == real.gap  # the same units: lam means the same
    assert abs(float(control.direction @ real.direction)) < 0.5 and abs(float(control.direction.norm()) - 1) < 1e-6
    again = fit_guard(module.model, tok, HARMFUL, HARMLESS, allowed_layers=[0, 1], random_direction_seed=3)
    torch.testing.assert_close(again.direction, control.direction)  # seeded
    residuals = last_token_residuals(module.model, chat_prompt_ids(tok, HARMFUL), tok.pad_token_id)
    torch.testing.assert_close(control.reference, residuals[control.layer] @ control.direction)


def test_penalty_is_the_mean_squared_change_in_gap_units():
    got = guard_penalty(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]), gap=2.0)
    assert float(got) == pytest.approx(0.25)  # ((-1/2)^2 + (1/2)^2) / 2


def test_probes_are_taken_in_turn_and_the_state_round_trips(tiny_model_dir, refusal, tmp_path):
    module = attack_module(tiny_model_dir, refusal, tmp_path)
    tok = tokenizer_of(tiny_model_dir)
    guard = build_guard(module.act_guard, module.model, tok, HARMFUL, [1], tmp_path / STATE_FILE)
    assert guard.state.layer == 1
    assert guard.probe_rows(0) == [0, 1, 2] and guard.probe_rows(1) == [3, 0, 1]
    again = GuardState.load(tmp_path / STATE_FILE)
    torch.testing.assert_close(again.direction, guard.state.direction)
    assert again.probe_ids == guard.state.probe_ids
    # a resume reads the saved state; without it, a moved model cannot stand in for the refusal model
    with pytest.raises(ActGuardError, match="no longer at its zero init"):
        build_guard(module.act_guard, module.model, tok, HARMFUL, [1], tmp_path / "none.pt", starting_model=False)
    with pytest.raises(ActGuardError, match="not among the layers the LoRA trains"):
        fit_guard(module.model, tok, HARMFUL, HARMLESS, allowed_layers=[1], layer=0)


def test_fit_writes_logs_and_pulls_the_projection_back(tiny_model_dir, refusal, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = attack_module(tiny_model_dir, refusal, tmp_path, max_prompts=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=CSVLogger(tmp_path, name="guard"),
                        log_every_n_steps=1, limit_val_batches=0, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    data = HarmfulQADataModule(source="sample", thread="red", tokenizer_name_or_path=str(tiny_model_dir),
                               max_length=64, batch_size=4)
    trainer.fit(module, datamodule=data)
    out = tmp_path / "out"
    assert (out / STATE_FILE).exists() and (out / "act_guard_stats.json").exists()
    assert "act_guard/penalty" in trainer.logged_metrics and "act_guard/projection" in trainer.logged_metrics
    state = GuardState.load(out / STATE_FILE)
    assert 0 < len(state.probe_ids) <= 8
