"""The runners: one LoRA fine-tuning run driven five ways, each by its framework's own training loop.

- ``plain``: ``torch`` + ``peft`` only, a ``for`` loop over a ``DataLoader`` (the framework-overhead floor);
- ``vanilla``: ``RefusalLoRAModule`` + ``HarmfulQADataModule``'s loader under ``lightning.Trainer.fit``
  (``vanilla_full``: the same with the model's own full-logits loss, only when asked for);
- ``<mode>_<target>``: the same with ``projection.enabled`` for every mode x target (a refusal adapter is
  made by perturbing a fresh LoRA's ``B`` and saved, then turned into a directions file);
- ``trl``: TRL's ``SFTTrainer.train`` with the same PEFT config (skipped, with a note, if TRL is missing).

TRL's settings that would change the math are aligned: its ``gradient_checkpointing`` (default on) is off,
``bf16`` follows the preset, its optimizer is the same unfused ``adamw_torch``; Lightning and TRL both log
every 10 steps to no external logger.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.harness import Runner
from bench.presets import CLIP, LOG_EVERY, LORA_ALPHA, LORA_DROPOUT, LORA_R, LR, THREAD, Preset
from bench.workload import BenchData, lora_config

PROJECTION_MODES = ("lora_param", "delta_weight", "subspace")
PROJECTION_TARGETS = ("grad", "update")
ALL_RUNNERS = ("plain", "vanilla", *(f"{m}_{t}" for m in PROJECTION_MODES for t in PROJECTION_TARGETS), "trl")
# Not run unless asked for: our module with the full-logits loss (what vanilla was before the chunked loss).
EXTRA_RUNNERS = ("vanilla_full",)
BASIC_RUNNERS = ("plain", "vanilla", "trl", *EXTRA_RUNNERS)  # no directions file needed


def trl_version() -> str | None:
    """TRL's version, or None when it cannot be imported."""
    try:
        import trl

        return trl.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


@dataclass
class Common:
    """What every runner is built from."""

    preset: Preset
    model_dir: Path
    workdir: Path
    data: BenchData
    device: torch.device
    total_steps: int
    directions_path: Path | None
    compile: bool = False  # torch.compile the model in every runner alike

    @property
    def dtype(self) -> str:
        return self.preset.dtype


def _loader(common: Common):
    from torch.utils.data import DataLoader

    from refusal_lightning.train.datamodule import collate

    return DataLoader(common.data.rows, batch_size=common.preset.batch, shuffle=False,
                      collate_fn=collate(common.data.pad_id), drop_last=True)


class PlainRunner(Runner):
    """``torch`` + ``peft`` and a ``for`` loop: the floor any framework's overhead is measured against."""

    def __init__(self, common: Common):
        super().__init__("plain", common.device.type == "cuda")
        from peft import get_peft_model

        from refusal_lightning.models.loading import load_causal_lm

        self.common = common
        self.model = get_peft_model(load_causal_lm(str(common.model_dir), dtype=common.dtype), lora_config())
        self.model.to(common.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if common.compile:
            self.model = torch.compile(self.model)
        self.lora_params = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0)

    def train(self) -> None:
        device, steps = self.common.device, 0
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.common.preset.gpu)
        self.baton.park()
        for batch in _loader(self.common):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast:
                loss = self.model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, CLIP)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            steps += 1
            self.baton.step_done()
            if steps == self.common.total_steps:
                return


class LightningRunner(Runner):
    """``RefusalLoRAModule`` + ``HarmfulQADataModule``'s loader, trained by an unmodified ``Trainer.fit``."""

    def __init__(self, name: str, common: Common, projection: dict[str, Any] | None, loss_impl: str = "chunked"):
        super().__init__(name, common.device.type == "cuda")
        import lightning as L

        from refusal_lightning.defences.projection import ProjectionConfig
        from refusal_lightning.train.datamodule import Encoded, HarmfulQADataModule, PairDataset
        from refusal_lightning.train.module import LoRASettings, RefusalLoRAModule

        baton = self.baton

        class _BatonCallback(L.Callback):
            def on_train_start(self, trainer, pl_module):
                baton.park()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                baton.step_done()

        proj = ProjectionConfig()
        if projection is not None:
            proj = ProjectionConfig(enabled=True, directions_path=str(common.directions_path), **projection)
        self.module = RefusalLoRAModule(
            model_name_or_path=str(common.model_dir), output_dir=str(common.workdir / "out" / name),
            lora=LoRASettings(r=LORA_R, alpha=LORA_ALPHA, dropout=LORA_DROPOUT), dtype=common.dtype,
            optimizer=lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.0),
            lr_schedule="constant", projection=proj, compile=common.compile, loss_impl=loss_impl,
        )
        self.projector = self.module.projector
        self.lora_params = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        self.datamodule = HarmfulQADataModule(source="sample", thread=THREAD,
                                              tokenizer_name_or_path=str(common.model_dir),
                                              max_length=common.preset.seq, batch_size=common.preset.batch)
        # The same fixed-shape rows as every runner, served by the data module's own loader
        # (StatefulDataLoader + LengthGroupedSampler + collate), so its overhead is part of the measurement.
        rows = [Encoded(r["input_ids"], r["labels"], False, False) for r in common.data.rows]
        self.datamodule.train_set = PairDataset(rows, list(range(len(rows))))
        self.datamodule.val_set = PairDataset(rows[:common.preset.batch], [0] * common.preset.batch)
        self.trainer = L.Trainer(
            accelerator="gpu" if common.device.type == "cuda" else "cpu", devices=1,
            precision="bf16-mixed" if common.preset.gpu else "32-true", max_steps=common.total_steps,
            gradient_clip_val=CLIP, log_every_n_steps=LOG_EVERY, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[_BatonCallback()], default_root_dir=str(common.workdir / "out" / name),
        )

    def train(self) -> None:
        self.trainer.fit(self.module, datamodule=self.datamodule)


class TRLRunner(Runner):
    """TRL's ``SFTTrainer.train`` with the same PEFT config: what a user might pick instead."""

    def __init__(self, common: Common):
        super().__init__("trl", common.device.type == "cuda")
        from datasets import Dataset
        from transformers import AutoTokenizer, TrainerCallback
        from transformers.trainer_callback import PrinterCallback
        from trl import SFTConfig, SFTTrainer

        from refusal_lightning.models.loading import load_causal_lm

        baton = self.baton

        class _BatonCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                baton.park()

            def on_step_end(self, args, state, control, **kwargs):
                baton.step_done()

        rows = common.data.rows
        dataset = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows],
                                     "labels": [r["labels"] for r in rows]})
        on_cpu = common.device.type != "cuda"
        args = SFTConfig(
            output_dir=str(common.workdir / "out" / "trl"), max_steps=common.total_steps,
            per_device_train_batch_size=common.preset.batch, gradient_accumulation_steps=1,
            learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=CLIP,
            optim="adamw_torch", bf16=common.preset.gpu, gradient_checkpointing=False,
            max_length=common.preset.seq, packing=False, logging_steps=LOG_EVERY, save_strategy="no",
            report_to="none", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=not on_cpu,
            use_cpu=on_cpu, seed=0, torch_compile=common.compile,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(common.model_dir))
        base = load_causal_lm(str(common.model_dir), dtype=common.dtype)
        self.trainer = SFTTrainer(model=base, args=args, train_dataset=dataset, processing_class=tokenizer,
                                  peft_config=lora_config(), callbacks=[_BatonCallback()])
        self.trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
        self.lora_params = sum(p.numel() for p in self.trainer.model.parameters() if p.requires_grad)

    def train(self) -> None:
        self.trainer.train()


def make_runner(name: str, common: Common) -> Runner:
    """Build the runner ``name`` (one of ``ALL_RUNNERS + EXTRA_RUNNERS``); its thread is not started."""
    if name == "plain":
        return PlainRunner(common)
    if name == "vanilla":
        return LightningRunner(name, common, None)
    if name == "vanilla_full":
        return LightningRunner(name, common, None, loss_impl="full")
    if name == "trl":
        return TRLRunner(common)
    mode, target = name.rsplit("_", 1)
    return LightningRunner(name, common, {"mode": mode, "target": target})
