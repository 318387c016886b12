"""The projection inside real (tiny) Lightning fits: what the parameters did, not what was logged.

The worst case on purpose: the "refusal" adapter is fitted on the attack's own data with the same seed
and the attack starts from the same base, so a vanilla attack retraces it (cos(dW_a, dW_r) = 1) and the
projection has to remove the very direction the attack wants. (On the tiny model a blue-thread adapter
is already almost orthogonal to the red attack, |cos| ~ 1e-3, which would test nothing.) Every check
compares the attack's LoRA tensors before and after the fit with the refusal adapter's.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from refusal_lightning.defences.directions import directions
from refusal_lightning.defences.projection import ProjectionConfig
from refusal_lightning.train.datamodule import HarmfulQADataModule
from refusal_lightning.train.module import LoRASettings, RefusalLoRAModule

RANK = 4


class MemoryLogger(Logger):
    """Keeps every logged scalar in memory."""

    def __init__(self):
        super().__init__()
        self.metrics: dict[str, list[float]] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append(float(value))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The 64-wide model gains nothing from intra-op threads, and spinning OpenMP workers make these
    fits ~5x slower on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def refusal(tmp_path_factory, tiny_model_dir):
    """The "refusal" adapter (r=4, all linear layers; red thread, see above) and its directions file."""
    tmp = tmp_path_factory.mktemp("ortho")
    fit(tmp / "refusal", tiny_model_dir, ProjectionConfig())
    adapter = tmp / "refusal" / "out"
    path = directions(str(adapter), str(tmp / "dirs.pt"), base_model_name=str(tiny_model_dir))
    return adapter, Path(path)


def _lora_state(module: RefusalLoRAModule) -> dict[str, dict[str, torch.Tensor | float]]:
    """Per LoRA module: A, B (float64 copies) and the PEFT scale, keyed like the directions file."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in module.model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            out[name.split("base_model.model.", 1)[1]] = {
                "A": m.lora_A["default"].weight.detach().double().clone(),
                "B": m.lora_B["default"].weight.detach().double().clone(),
                "s": float(m.scaling["default"]),
            }
    return out


def fit(tmp: Path, model_dir: Path, projection: ProjectionConfig, *, steps: int = 20, optimizer=None,
        precision: str = "32-true", accumulate: int = 1, batches=None):
    """One in-process fit on the red thread; returns (initial LoRA, final LoRA, logger, module)."""
    L.seed_everything(0, verbose=False)  # same LoRA init in every run
    module = RefusalLoRAModule(
        model_name_or_path=str(model_dir), output_dir=str(tmp / "out"),
        lora=LoRASettings(r=RANK, alpha=2 * RANK, dropout=0.0), lr_schedule="constant",
        optimizer=optimizer or (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
        projection=projection,
    )
    before = _lora_state(module)
    logger = MemoryLogger()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision=precision,
                        accumulate_grad_batches=accumulate, logger=logger, log_every_n_steps=1,
                        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    if batches is None:
        data = HarmfulQADataModule(source="sample", thread="red", tokenizer_name_or_path=str(model_dir),
                                   max_length=96, batch_size=4)
        trainer.fit(module, datamodule=data)
    else:
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return before, _lora_state(module), logger, module


def _flat(parts) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in parts])


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x @ y / (x.norm() * y.norm()))


def delta_weight_cos(before, after, refusal_dirs) -> float:
    """Global cosine between the accumulated dW_a = s_a (B A - B0 A0) and dW_r, densely materialised."""
    acc = _flat([after[k]["s"] * (after[k]["B"] @ after[k]["A"] - before[k]["B"] @ before[k]["A"]) for k in after])
    ref = _flat([m["scale"] * m["B"].double() @ m["A"].double() for m in (refusal_dirs[k] for k in after)])
    return _cos(acc, ref)


@pytest.fixture(scope="module")
def refusal_dirs(refusal):
    return torch.load(refusal[1], weights_only=True)["modules"]


def test_vanilla_run_is_monitored_not_projected(tmp_path, tiny_model_dir, refusal, refusal_dirs):
    cfg = ProjectionConfig(enabled=False, directions_path=str(refusal[1]), target="update")
    before, after, logger, _ = fit(tmp_path, tiny_model_dir, cfg)
    for tag in ("proj/removed_frac", "drift/cos", "drift/along"):
        assert logger.metrics.get(tag), f"{tag} not logged: {sorted(logger.metrics)}"
    assert "update/removed_frac" not in logger.metrics  # monitor-only: nothing is written back
    assert max(logger.metrics["proj/removed_frac"]) > 0.5  # it would remove most of the gradient
    # unprojected, the attack retraces the "refusal" adapter; the logged drift is the parameters' own
    cos = delta_weight_cos(before, after, refusal_dirs)
    assert cos > 0.99
    assert logger.metrics["drift/cos"][-1] == pytest.approx(cos, abs=1e-4)
    stats = json.loads((tmp_path / "out" / "projection_stats.json").read_text())
    assert stats["enabled"] is False and stats["n_modules_covered"] == len(after)


@pytest.mark.parametrize("granularity", ["module", "global"])
def test_lora_param_update_stays_orthogonal_per_tensor(tmp_path, tiny_model_dir, refusal, refusal_dirs,
                                                       granularity):
    cfg = ProjectionConfig(enabled=True, directions_path=str(refusal[1]), mode="lora_param",
                           granularity=granularity, target="update")
    before, after, _, _ = fit(tmp_path, tiny_model_dir, cfg)
    if granularity == "module":  # each tensor's change is orthogonal to the same-named refusal tensor
        worst = max(abs(_cos(after[k][t].reshape(-1) - before[k][t].reshape(-1),
                             refusal_dirs[k][t].double().reshape(-1))) for k in after for t in ("A", "B"))
    else:  # one joint direction over the concatenation of all refusal tensors
        delta = _flat([after[k][t] - before[k][t] for k in after for t in ("A", "B")])
        worst = abs(_cos(delta, _flat([refusal_dirs[k][t].double() for k in after for t in ("A", "B")])))
    moved = max(float((after[k]["A"] - before[k]["A"]).norm()) for k in after)
    assert moved > 1e-2  # the attack did train
    assert worst < 1e-4


def test_subspace_k_equals_r_keeps_delta_weight_orthogonal(tmp_path, tiny_model_dir, refusal, refusal_dirs):
    cfg = ProjectionConfig(enabled=True, directions_path=str(refusal[1]), mode="subspace", k=RANK,
                           target="update")
    before, after, _, _ = fit(tmp_path, tiny_model_dir, cfg)
    assert abs(delta_weight_cos(before, after, refusal_dirs)) < 1e-4


def test_delta_weight_update_stays_orthogonal_to_first_order(tmp_path, tiny_model_dir, refusal, refusal_dirs):
    cfg = ProjectionConfig(enabled=True, directions_path=str(refusal[1]), mode="delta_weight", target="update")
    before, after, logger, module = fit(tmp_path, tiny_model_dir, cfg)
    assert abs(delta_weight_cos(before, after, refusal_dirs)) < 1e-2
    assert logger.metrics.get("update/removed_frac")
    fracs = module.projector.summary()["removed_frac"]
    assert fracs["update"]["n"] == 20 and fracs["grad"]["n"] == 20  # grads are monitored as well


def test_grad_target_under_adamw_is_not_exact(tmp_path, tiny_model_dir, refusal, refusal_dirs):
    # Why target=update exists: Adam rescales the projected gradient per coordinate, so the step leaks
    # back into the refusal direction (here |cos| ~ 0.1 against < 1e-2 with target=update).
    cfg = ProjectionConfig(enabled=True, directions_path=str(refusal[1]), mode="delta_weight", target="grad")
    before, after, _, _ = fit(tmp_path, tiny_model_dir, cfg)
    assert abs(delta_weight_cos(before, after, refusal_dirs)) > 2e-2


def _fixed_batch(model_dir: Path) -> dict[str, torch.Tensor]:
    data = HarmfulQADataModule(source="sample", thread="red", tokenizer_name_or_path=str(model_dir),
                               max_length=64, batch_size=4)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


@pytest.mark.parametrize("mode", ["delta_weight", "subspace"])
def test_bf16_accumulation_matches_fp32_projected_gradient(tmp_path, tiny_model_dir, refusal, mode):
    # Two optimizer steps on one fixed batch. With SGD at lr=1 each parameter change *is* the projected
    # gradient, so the runs compare the projection's output, which must see the gradient after AMP and
    # accumulation. Tolerances (relative L2 over all LoRA tensors): fp32 with 4x accumulation of the
    # same batch is exact (1e-6); bf16-mixed autocast perturbs the gradient itself, measured ~0.7%,
    # allowed 3%.
    cfg = ProjectionConfig(enabled=True, directions_path=str(refusal[1]), mode=mode, target="grad")
    batch = _fixed_batch(tiny_model_dir)
    sgd = lambda p: torch.optim.SGD(p, lr=1.0)  # noqa: E731
    deltas = {}
    for name, precision, accumulate in (("fp32", "32-true", 1), ("fp32x4", "32-true", 4),
                                        ("bf16x4", "bf16-mixed", 4)):
        before, after, logger, _ = fit(tmp_path / name, tiny_model_dir, cfg, steps=2, optimizer=sgd,
                                       precision=precision, accumulate=accumulate,
                                       batches=[batch] * (2 * accumulate))
        assert len(logger.metrics["proj/removed_frac"]) == 2 and min(logger.metrics["proj/removed_frac"]) > 0.1
        deltas[name] = _flat([after[k][t] - before[k][t] for k in after for t in ("A", "B")])

    def rel(name: str) -> float:
        return float((deltas[name] - deltas["fp32"]).norm() / deltas["fp32"].norm())

    assert rel("fp32x4") < 1e-6
    assert rel("bf16x4") < 3e-2


MODE_TARGET_CASES = [("vanilla", None), ("lora_param", "grad"), ("lora_param", "update"), ("delta_weight", "grad"),
                     ("delta_weight", "update"), ("subspace", "grad"), ("subspace", "update")]


@pytest.fixture(scope="module")
def mode_target_table(tmp_path_factory, tiny_model_dir, refusal, refusal_dirs):
    """|cos(dW_a, dW_r)| of the accumulated update and the train loss, per mode x target (README table)."""
    tmp = tmp_path_factory.mktemp("modes")
    table = {}
    for mode, target in MODE_TARGET_CASES:
        cfg = (ProjectionConfig(enabled=False, directions_path=str(refusal[1])) if target is None else
               ProjectionConfig(enabled=True, directions_path=str(refusal[1]), mode=mode, target=target,
                                k=RANK if mode == "subspace" else None))
        before, after, logger, _ = fit(tmp / f"{mode}-{target}", tiny_model_dir, cfg, steps=30)
        loss = logger.metrics["train/loss"]
        table[(mode, target)] = {"cos": abs(delta_weight_cos(before, after, refusal_dirs)),
                                 "loss_first": sum(loss[:5]) / 5, "loss_last": sum(loss[-5:]) / 5}
    print("\n| mode | target | abs cos(dW_a, dW_r) | train loss, first 5 -> last 5 steps |")
    for (mode, target), row in table.items():
        print(f"| {mode} | {target or '-'} | {row['cos']:.2e} | {row['loss_first']:.3f} -> {row['loss_last']:.3f} |")
    return table


def test_which_mode_and_target_keep_delta_weight_orthogonal(mode_target_table):
    t = mode_target_table
    assert t[("vanilla", None)]["cos"] > 0.9  # worst case: unconstrained, the attack retraces dW_r
    # the update target keeps dW_a orthogonal: exactly for subspace (k = r), to first order for delta_weight
    assert t[("subspace", "update")]["cos"] < 1e-4
    assert t[("delta_weight", "update")]["cos"] < 1e-2
    # the grad target under AdamW only constrains the gradient: Adam's per-coordinate step leaks back
    assert t[("delta_weight", "grad")]["cos"] > 2e-2
    # lora_param constrains each factor tensor, not their product dW = s B A: no guarantee on dW
    # (measured 8e-3 with grad, 8e-2 with update: whatever the factors' paths happen to give)
    assert t[("lora_param", "update")]["cos"] > 2e-2


def test_update_target_still_descends(mode_target_table):
    # Adam's moments see the projected gradient too, so the projected steps keep lowering the loss
    # (fed the raw gradient, Adam's state points along the removed direction and the steps stall).
    for mode in ("delta_weight", "subspace"):
        row = mode_target_table[(mode, "update")]
        assert row["loss_last"] < row["loss_first"] - 0.1, row
