"""AsFT's loss term: equal to its dense value, gradients only into the trained LoRA, logged in a real fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import REPO, make_random_adapter

from refusal_lightning.defences.asft import AsftConfig
from refusal_lightning.defences.directions import DirectionsError, directions
from refusal_lightning.train.datamodule import HarmfulQADataModule
from refusal_lightning.train.module import LoRASettings, RefusalLoRAModule

TARGETS = ["q_proj", "v_proj", "down_proj"]
LAM = 0.7


@pytest.fixture(scope="module")
def refusal(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("asft")
    adapter = make_random_adapter(tiny_model_dir, tmp / "refusal", seed=1)  # q, v, down; r=4
    return adapter, Path(directions(str(adapter), str(tmp / "dirs.pt")))


def attack_module(model_dir: Path, refusal, tmp: Path, projector: str = "paper", **asft) -> RefusalLoRAModule:
    """An attack (rank 2, unlike the refusal's 4) on base + frozen refusal LoRA, with AsFT on; B randomised
    (PEFT starts it at 0, where the term is 0)."""
    from peft.tuners.lora import LoraLayer

    adapter, dirs = refusal
    torch.manual_seed(0)
    module = RefusalLoRAModule(
        model_name_or_path=str(model_dir), output_dir=str(tmp / "out"), merge_adapters=[str(adapter)],
        lora=LoRASettings(r=2, alpha=4.0, dropout=0.0, target_modules=TARGETS), lr_schedule="constant",
        asft=AsftConfig(**{"enabled": True, "lam": LAM, "directions_path": str(dirs), "projector": projector,
                           **asft}),
    )
    with torch.no_grad():
        for m in module.model.modules():
            if isinstance(m, LoraLayer) and "default" in m.lora_B:
                m.lora_B["default"].weight.normal_()
    return module


def dense_penalty(module: RefusalLoRAModule, dirs: Path, projector: str) -> torch.Tensor:
    """``lam * sum ||(I - C) B A||_F^2`` with every matrix materialised (float64), differentiable in A, B."""
    from peft.tuners.lora import LoraLayer

    entries = torch.load(dirs, weights_only=True)["modules"]
    total = torch.zeros((), dtype=torch.float64)
    n = 0
    for name, m in module.model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            e = entries[name.split("base_model.model.", 1)[1]]
            v = e["scale"] * e["B"].double() @ e["A"].double()
            c = v @ v.T / torch.linalg.matrix_norm(v) if projector == "paper" else v @ torch.linalg.pinv(v)
            ba = m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double()
            total = total + torch.linalg.matrix_norm((torch.eye(c.shape[0], dtype=c.dtype) - c) @ ba) ** 2
            n += 1
    assert n == 6
    return LAM * total


@pytest.mark.parametrize("projector", ["paper", "exact"])
def test_term_equals_its_dense_value(tiny_model_dir, refusal, tmp_path, projector):
    module = attack_module(tiny_model_dir, refusal, tmp_path, projector)
    with torch.no_grad():
        got, want = module.asft_penalty(), dense_penalty(module, refusal[1], projector)
    assert float(want) > 0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_gradient_flows_only_into_the_attack_lora(tiny_model_dir, refusal, tmp_path):
    module = attack_module(tiny_model_dir, refusal, tmp_path)
    params = dict(module.named_parameters())
    for p in params.values():  # the frozen parts too: a leak would show as a gradient here
        p.requires_grad_(True)
    module.asft_penalty().backward()
    got = {n: p.grad.clone() for n, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
    attack = {n for n in params if ".default." in n and "lora_" in n}
    assert set(got) == attack and len(attack) == 12  # 6 modules x (A, B); refusal (frozen_0) and base untouched
    module.zero_grad(set_to_none=True)
    dense_penalty(module, refusal[1], "paper").backward()
    for name, grad in got.items():
        want = params[name].grad.double()
        torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_zero_basis_control_is_plain_l2_on_the_attack_update(tiny_model_dir, refusal, tmp_path):
    from peft.tuners.lora import LoraLayer

    module = attack_module(tiny_model_dir, refusal, tmp_path, alignment_basis="zero")
    want = sum(torch.linalg.matrix_norm(m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double())
               ** 2 for m in module.model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A)
    with torch.no_grad():
        torch.testing.assert_close(module.asft_penalty().double(), LAM * want, rtol=1e-5, atol=0)
    assert module.asft_penalty.metadata["alignment_basis"] == "zero"


def test_random_basis_control_keeps_the_spectrum_on_other_directions(tiny_model_dir, refusal, tmp_path):
    def alignments(module):
        return [(g.U.double(), g.w.double()) for g in module.asft_penalty._groups]

    real = alignments(attack_module(tiny_model_dir, refusal, tmp_path, alignment_basis="refusal"))
    rand = alignments(attack_module(tiny_model_dir, refusal, tmp_path, alignment_basis="random", basis_seed=5))
    again = alignments(attack_module(tiny_model_dir, refusal, tmp_path, alignment_basis="random", basis_seed=5))
    for (u, w), (q, v), (q2, _) in zip(real, rand, again, strict=True):
        torch.testing.assert_close(v, w)  # the same eigenvalues of C
        eye = torch.eye(q.shape[-1], dtype=q.dtype).expand(q.shape[0], -1, -1)
        torch.testing.assert_close(q.mT @ q, eye, atol=1e-6, rtol=0)  # orthonormal columns
        torch.testing.assert_close(q, q2)  # seeded
        # the refusal directions are not kept: their overlap is what random k-frames in `out` dims give
        assert float(torch.linalg.matrix_norm(u.mT @ q).max()) < 0.95 * float(torch.linalg.matrix_norm(eye).max())
    with pytest.raises(DirectionsError, match="unknown asft.alignment_basis 'diagonal'"):
        attack_module(tiny_model_dir, refusal, tmp_path, alignment_basis="diagonal")


def test_fit_adds_and_logs_the_term(tiny_model_dir, refusal, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = attack_module(tiny_model_dir, refusal, tmp_path)
    logger = CSVLogger(tmp_path, name="asft")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=logger, log_every_n_steps=1,
                        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    data = HarmfulQADataModule(source="sample", thread="red", tokenizer_name_or_path=str(tiny_model_dir),
                               max_length=64, batch_size=4)
    start = float(module.asft_penalty().detach())
    trainer.fit(module, datamodule=data)
    logged = trainer.logged_metrics
    assert "asft/penalty" in logged and "train/loss" in logged
    assert float(logged["asft/penalty"]) < start  # AdamW (lr 2e-4) on a loss that holds the term pulls it down


def test_bad_directions_fail_before_any_step(tiny_model_dir, refusal, tmp_path):
    other = make_random_adapter(tiny_model_dir, tmp_path / "other", seed=3)
    other_dirs = directions(str(other), str(tmp_path / "other.pt"))
    with pytest.raises(DirectionsError, match="merge_adapters does not hold") as exc:
        attack_module(tiny_model_dir, refusal, tmp_path, directions_path=other_dirs, lam=-1.0)
    assert "asft.lam must be >= 0" in str(exc.value)  # every problem at once
    with pytest.raises(DirectionsError, match="neither asft.directions_path nor projection.directions_path"):
        attack_module(tiny_model_dir, refusal, tmp_path, directions_path=None)


def test_cpu_asft_arm_is_the_vanilla_attack_plus_asft_with_the_papers_settings():
    pipe = yaml.safe_load((REPO / "configs/cpu/pipeline_baselines.yaml").read_text())
    assert pipe["arms"]["vanilla"] in ({}, None)
    assert pipe["arms"]["asft"] == {"overrides": ["--model.asft.enabled=true"]}  # nothing else differs
    attack = yaml.safe_load((REPO / pipe["attack_config"]).read_text())
    assert "asft" not in attack["model"]  # the defaults below are what the arm trains with
    defaults = AsftConfig()
    assert (defaults.lam, defaults.projector, defaults.directions_path) == (1.0, "paper", None)
    assert defaults.alignment_basis == "refusal"
    assert attack["model"]["projection"]["enabled"] is False and attack["model"]["projection"]["directions_path"]
