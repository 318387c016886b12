"""Training throughput: a plain PyTorch + PEFT loop vs. our LightningModule vs. each projection vs. TRL.

    python scripts/bench_train.py --preset cpu-small --out artifacts/bench/train.json [--md F.md] [--steps N]

Every runner trains the same Qwen3-architecture model (random weights, built in-process by ``tiny.py``;
nothing is downloaded) with the same LoRA, precision, optimizer (AdamW, constant LR, gradient clipping
1.0 as in the shipped configs) and batch shape, on the same data:

- ``plain``: ``torch`` + ``peft`` only, a ``for`` loop over a ``DataLoader`` (the framework-overhead floor);
- ``vanilla``: ``RefusalLoRAModule`` + ``HarmfulQADataModule``'s loader under ``lightning.Trainer.fit``;
- ``<mode>_<target>``: the same with ``projection.enabled`` for every mode x target (a refusal adapter is
  made by perturbing a fresh LoRA's ``B`` and saved, then turned into a directions file);
- ``trl``: TRL's ``SFTTrainer.train`` with the same PEFT config (skipped, with a note, if TRL is missing).

Data. The bundled HarmfulQA sample is encoded by the data module (red thread, chat template, reply-only
labels). Its pairs are shorter than the presets' sequence length, so consecutive pairs are concatenated
and cut into rows of exactly ``seq`` tokens: every batch is ``batch x seq`` with no padding, for every
runner, so non-pad tokens/s is ``batch * seq / step time``. The padding a real epoch would carry is
reported separately as ``padding_efficiency`` (the data module's length-grouped batches of the sample).

Interleaving and what a "step" is. All runners live in one process and are run round-robin (the order
rotates every round), so machine noise hits all of them alike: one optimizer step per runner per round on
the CPU presets, five on the GPU preset (a device sync after every step would hide the host/device overlap).
Each framework runs its own, unmodified training loop (``trainer.fit``, ``SFTTrainer.train``, the plain
``for`` loop) in a worker thread; a callback at the end of every optimizer step (Lightning
``on_train_batch_end``, transformers ``on_step_end``) records the time and, once the runner's quota for
the round is used, parks the thread until the scheduler hands it the next quota. Only one runner thread
runs at a time. A step's time is from the previous step's end to this one's: it includes everything the
framework does between optimizer steps (fetching and collating the batch, moving it to the device,
hooks, logging, the projection), which is the honest framework overhead. We do not call
``training_step``/``optimizer_step`` by hand: that would skip the loop code we want to measure. The first
``--warmup`` steps of every runner (lazy init, first-touch allocation) are not timed. On CUDA the device
is synchronised when a runner's quota ends, so the last step of a round also pays for queued work.
``tokens_per_s`` is ``batch * seq / median step time`` (robust to noise spikes from other processes);
``tokens_per_s_mean`` divides all timed tokens by all timed seconds. ``ratios`` (and ``vs_vanilla``) are
the median over rounds of the paired ratio ``time(reference) / time(runner)``: both ran seconds apart, so
load from other processes on a shared machine largely cancels within a round. ``ratios_of_medians`` and
``ratios_cpu_time`` (process CPU seconds per step, all threads) are reported as cross-checks. The timed
rounds stop early, after a whole round, once ``--budget-s`` is spent (cpu-small: 330 s), so a loaded
2-core machine still finishes the default run within 10 minutes.

Memory. Runners sharing one process cannot be told apart by RSS, so ``peak_rss_mb`` comes from a second
pass: each runner is rebuilt alone in a fresh subprocess, trained for a few steps, and reports its peak
RSS (``VmHWM``), plus ``peak_cuda_mb`` (``torch.cuda.max_memory_allocated``) on a GPU. Every probe imports
the same libraries (TRL included) before building, so differences do not come from imports;
``peak_rss_above_imports_mb`` subtracts what the process held before building. ``--mem inproc`` (for
quick runs) instead reports the peak above the memory held when the runner's round started.
``mem_ratios.vanilla_vs_plain`` is vanilla's peak RSS / the plain loop's.

The ``cpu-vocab`` preset is ``cpu-small``'s model at Qwen3's vocabulary (151,936; batch 4 x 512): there
the ``tokens x vocab`` logits dominate. Its default runners are ``plain`` (the model's own full-logits
loss), ``vanilla`` (our module with its default, chunked loss) and ``trl``; ``vanilla_full`` (our module
with ``loss_impl: full``) can be added with ``--runners``. ``--compile`` compiles the model in every
runner alike. A runner that could not run is listed in ``skipped`` and, with every ratio and memory
figure it leaves out, in ``missing`` (key -> why); absent figures are never written as null.
``directions_mem_ratio``: elements of every tensor a projector holds (views counted once, the model's
own parameters excluded) / the attack LoRA's trainable parameter count (target <= 2).

Settings that would change the math are aligned, not left at each framework's default: TRL's
``gradient_checkpointing`` (default on) is off, ``bf16`` follows the preset, its optimizer is the same
unfused ``adamw_torch``; Lightning and TRL both log every 10 steps to no external logger.
Gradient accumulation is 1, so per-optimizer-step costs (the projection) are not amortised: the
projection ratios are worst-case for the shipped configs, which accumulate 4 batches.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

LORA_R, LORA_ALPHA, LORA_DROPOUT = 8, 16.0, 0.05
LR, CLIP = 2e-4, 1.0
LOG_EVERY = 10
THREAD = "red"  # the attack fits train on red replies
# Targets from the issues: (ratio key pattern, minimum).
GRAD_TARGET, UPDATE_TARGET, PLAIN_TARGET, TRL_TARGET = 0.95, 0.90, 0.95, 1.2
PADDING_TARGET, DIRECTIONS_MEM_TARGET = 0.90, 2.0
# At the real vocabulary (issue 12): vanilla's peak RSS at most 0.6x the plain loop's, and no slower.
VOCAB_MEM_TARGET, VOCAB_PLAIN_TARGET = 0.6, 1.0
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


def log(msg: str) -> None:
    print(f"[bench_train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- machine
def machine_info(device: torch.device) -> dict[str, Any]:
    import lightning
    import peft
    import transformers

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "?"
    info = {
        "nproc": os.cpu_count(), "cpu_model": cpu, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "trl": _trl_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _trl_version() -> str | None:
    try:
        import trl

        return trl.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


# ----------------------------------------------------------------------------- shared artefacts
def build_base_model(preset: Preset, folder: Path, device: torch.device) -> Path:
    """Write the preset's random-weight Qwen3 model + the tiny tokenizer into ``folder`` (reused if there)."""
    if (folder / "config.json").exists():
        return folder
    from refusal_lightning.tiny import build_tokenizer, save_tiny_model

    if preset.vocab_size is not None:
        return _save_wide_vocab_model(folder, preset)
    if not preset.real_shape:
        return save_tiny_model(folder, seed=0, hidden_size=preset.hidden_size, num_layers=preset.num_layers)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Qwen/Qwen3-0.6B's config.json shape; the tiny tokenizer's ids (< 1024) are a subset of the vocab.
    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def _save_wide_vocab_model(folder: Path, preset: Preset) -> Path:
    """tiny.py's model at ``preset``'s width and depth with ``preset.vocab_size`` (tied embeddings, as
    Qwen3-0.6B), random fp32 weights; the tiny tokenizer's ids (< 1024) index the first rows."""
    from transformers import Qwen3ForCausalLM

    from refusal_lightning.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    small = build_model(tokenizer, seed=0, hidden_size=preset.hidden_size, num_layers=preset.num_layers,
                        num_heads=max(4, preset.hidden_size // 64), num_kv_heads=max(2, preset.hidden_size // 128))
    config = small.config
    config.vocab_size = preset.vocab_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config)
    model.generation_config = small.generation_config
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lora_config():
    from peft import LoraConfig

    from refusal_lightning.model import ALL_LINEAR

    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=list(ALL_LINEAR),
                      task_type="CAUSAL_LM")


def make_directions(model_dir: Path, workdir: Path, dtype: str) -> Path:
    """A 'refusal' adapter (a fresh LoRA whose zero-initialised ``B`` is perturbed) and its directions file."""
    out = workdir / "refusal_param_directions.pt"
    if out.exists():
        return out
    from peft import get_peft_model

    from refusal_lightning.directions import directions
    from refusal_lightning.loading import load_causal_lm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = get_peft_model(load_causal_lm(str(model_dir), dtype=dtype), lora_config())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
    adapter = workdir / "refusal_lora"
    model.save_pretrained(adapter)
    directions(str(adapter), str(out), base_model_name=str(model_dir))
    return out


@dataclass
class BenchData:
    """Fixed-shape training rows and the sample's padding statistics."""

    rows: list[dict[str, list[int]]]
    pad_id: int
    padding: dict[str, Any]


def build_data(model_dir: Path, preset: Preset, n_rows: int) -> BenchData:
    """Encode the bundled sample with the data module, then concatenate pairs into ``seq``-token rows."""
    from refusal_lightning.datamodule import HarmfulQADataModule, LengthGroupedSampler, padding_efficiency

    padding: dict[str, Any] = {"batch_size": preset.batch, "max_length": preset.seq}
    encoded = None
    for thread in ("red", "blue"):
        dm = HarmfulQADataModule(source="sample", thread=thread, tokenizer_name_or_path=str(model_dir),
                                 max_length=preset.seq, batch_size=preset.batch, group_by_length=True)
        dm.setup("fit")
        lengths = dm.train_set.lengths()
        ungrouped = LengthGroupedSampler(lengths, preset.batch, seed=0, group_by_length=False)._batches()
        padding[thread] = {"grouped": dm.stats["padding_efficiency"],
                           "ungrouped": padding_efficiency(lengths, ungrouped), "train_pairs": len(lengths),
                           "token_length_percentiles": dm.stats["token_length_percentiles"]}
        if thread == THREAD:
            encoded, pad_id = dm.train_set.examples, dm.tokenizer.pad_token_id
    assert encoded
    ids: list[int] = []
    labels: list[int] = []
    rows = []
    i = 0
    while len(rows) < n_rows:  # repeat the sample as often as needed
        ex = encoded[i % len(encoded)]
        ids += ex.input_ids
        labels += ex.labels
        i += 1
        while len(ids) >= preset.seq and len(rows) < n_rows:
            rows.append({"input_ids": ids[:preset.seq], "labels": labels[:preset.seq]})
            ids, labels = ids[preset.seq:], labels[preset.seq:]
    return BenchData(rows=rows, pad_id=pad_id, padding=padding)


# ------------------------------------------------------------------------------ step hand-over
class StopTraining(Exception):
    """Raised inside a parked runner's training loop when the scheduler is done with it."""


class Baton:
    """Hands a runner thread a quota of optimizer steps and records their times.

    The runner thread calls ``park()`` once when it is ready to train and ``step_done()`` after every
    optimizer step; the scheduler calls ``run(n)`` and blocks until the runner has done n steps.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._go = threading.Event()
        self._parked = threading.Event()
        self._quota = 0
        self._last = (0.0, 0.0)
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.stopping = False
        self.error: BaseException | None = None
        self.thread_done = False

    # runner side
    def park(self) -> None:
        self._parked.set()
        self._go.wait()
        self._go.clear()
        if self.stopping:  # leave the framework's loop at once: no leftover steps, no end-of-fit export
            raise StopTraining
        self._last = (time.perf_counter(), time.process_time())

    def step_done(self) -> None:
        self._quota -= 1
        if self._quota == 0 and self.cuda:
            torch.cuda.synchronize()  # the round's last step pays for the work still queued
        # Process CPU time covers every thread (intra-op pool included); the parked runners use none.
        now = (time.perf_counter(), time.process_time())
        self.times.append(now[0] - self._last[0])
        self.cpu_times.append(now[1] - self._last[1])
        self._last = now
        if self._quota == 0:
            self.park()
        elif self._quota < 0:
            raise RuntimeError("runner stepped past its quota")

    # scheduler side
    def wait_ready(self, thread: threading.Thread) -> None:
        self._parked.wait()
        self._check(thread)

    def run(self, n: int, thread: threading.Thread) -> list[float]:
        self.times, self.cpu_times = [], []
        self._quota = n
        self._parked.clear()
        self._go.set()
        self._parked.wait()
        self._check(thread)
        if len(self.times) != n:
            raise RuntimeError(f"runner finished after {len(self.times)} of {n} steps")
        return self.times

    def finish(self, thread: threading.Thread) -> None:
        self.stopping = True
        self._parked.clear()
        self._go.set()
        thread.join()
        self._check(thread)

    def _check(self, thread: threading.Thread) -> None:
        if self.error is not None:
            raise RuntimeError(f"runner thread failed: {self.error!r}") from self.error
        if self.thread_done and not self.stopping:
            raise RuntimeError("runner thread ended before it was told to")


class Runner:
    """One training setup: builds in the main thread, trains in its own thread under a ``Baton``."""

    def __init__(self, name: str, cuda: bool):
        self.name = name
        self.baton = Baton(cuda)
        self.thread = threading.Thread(target=self._main, name=f"bench-{name}", daemon=True)
        self.lora_params = 0
        self.projector = None

    def start(self) -> None:
        self.thread.start()
        self.baton.wait_ready(self.thread)

    def _main(self) -> None:
        try:
            self.train()
        except StopTraining:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the scheduler, which re-raises
            if not isinstance(exc.__cause__ or exc.__context__, StopTraining):
                self.baton.error = exc
        finally:
            self.baton.thread_done = True
            self.baton._parked.set()

    def train(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


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
        return "bfloat16" if self.preset.gpu else "float32"


def _loader(common: Common):
    from torch.utils.data import DataLoader

    from refusal_lightning.datamodule import collate

    return DataLoader(common.data.rows, batch_size=common.preset.batch, shuffle=False,
                      collate_fn=collate(common.data.pad_id), drop_last=True)


class PlainRunner(Runner):
    """``torch`` + ``peft`` and a ``for`` loop: the floor any framework's overhead is measured against."""

    def __init__(self, common: Common):
        super().__init__("plain", common.device.type == "cuda")
        from peft import get_peft_model

        from refusal_lightning.loading import load_causal_lm

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

        from refusal_lightning.datamodule import HarmfulQADataModule, PairDataset
        from refusal_lightning.model import LoRASettings, RefusalLoRAModule
        from refusal_lightning.projection import ProjectionConfig

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
        from refusal_lightning.datamodule import Encoded

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

        from refusal_lightning.loading import load_causal_lm

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


PROJECTION_MODES = ("lora_param", "delta_weight", "subspace")
PROJECTION_TARGETS = ("grad", "update")
ALL_RUNNERS = ("plain", "vanilla", *(f"{m}_{t}" for m in PROJECTION_MODES for t in PROJECTION_TARGETS), "trl")
# Not run unless asked for: our module with the full-logits loss (what vanilla was before the chunked loss).
EXTRA_RUNNERS = ("vanilla_full",)
BASIC_RUNNERS = ("plain", "vanilla", "trl", *EXTRA_RUNNERS)  # no directions file needed


def make_runner(name: str, common: Common) -> Runner:
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


# ----------------------------------------------------------------------------------- measuring
def held_tensor_elements(obj: Any) -> int:
    """Elements of every tensor reachable from ``obj``'s attributes, each storage counted once.

    ``nn.Parameter``s (the model's own LoRA weights the projector points at) are not counted.
    """
    storages: dict[tuple, int] = {}
    seen: set[int] = set()

    def visit(x: Any) -> None:
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, torch.nn.Parameter):
            return
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            storages[(x.device, st.data_ptr())] = st.nbytes() // max(1, x.element_size())
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                visit(v)
        elif hasattr(x, "__dict__") and not isinstance(x, (type, torch.nn.Module)):
            for v in vars(x).values():
                visit(v)

    visit(obj)
    return sum(storages.values())


def _rss_mb() -> float:
    """Current RSS of this process (``VmRSS``; psutil where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    """Peak RSS of this process (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Timings:
    """Per runner, per round: the wall and process-CPU seconds of each timed step."""

    wall: dict[str, list[list[float]]]
    cpu: dict[str, list[list[float]]]
    rounds: int
    stopped_by_budget: bool


def summarise(wall: list[list[float]], cpu: list[list[float]], tokens_per_step: int) -> dict[str, Any]:
    times = sorted(t for rnd in wall for t in rnd)
    median = statistics.median(times)

    def q(p: float) -> float:
        return times[min(len(times) - 1, int(p * len(times)))]

    return {
        "tokens_per_s": tokens_per_step / median,
        "step_s_median": median,
        "step_s_p10": q(0.10),
        "step_s_p90": q(0.90),
        "tokens_per_s_mean": tokens_per_step * len(times) / sum(times),
        "cpu_s_median": statistics.median(t for rnd in cpu for t in rnd),
        "steps_timed": len(times),
    }


def paired_ratio(per_round: dict[str, list[list[float]]], name: str, ref: str) -> float | None:
    """Throughput of ``name`` relative to ``ref``: the median over rounds of ``time(ref) / time(name)``.

    Both ran within seconds of each other in every round, so load that comes and goes over seconds
    (other processes on a shared machine) cancels in each round's ratio; the median drops bursts.
    """
    if name not in per_round or ref not in per_round:
        return None
    return statistics.median(sum(r) / sum(x) for r, x in zip(per_round[ref], per_round[name], strict=True))


def run_interleaved(runners: list[Runner], warmup: int, steps: int, per_round: int, device: torch.device,
                    inproc_mem: bool, budget_s: float) -> tuple[Timings, dict[str, float]]:
    """Warm every runner up, then hand out ``per_round`` steps per runner per round, rotating the order.

    Stops after the round that would overrun ``budget_s`` (at least 5 rounds are always run).
    """
    wall: dict[str, list[list[float]]] = {r.name: [] for r in runners}
    cpu: dict[str, list[list[float]]] = {r.name: [] for r in runners}
    mem: dict[str, float] = {r.name: 0.0 for r in runners}
    for r in runners:
        if warmup:
            r.baton.run(warmup, r.thread)
    t0 = time.perf_counter()
    done = rnd = 0
    stopped = False
    while done < steps:
        n = min(per_round, steps - done)
        order = runners[rnd % len(runners):] + runners[:rnd % len(runners)]
        for r in order:
            if inproc_mem:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                    start = torch.cuda.memory_allocated(device) / 2**20
                else:
                    _reset_peak_rss()
                    start = _rss_mb()
            wall[r.name].append(list(r.baton.run(n, r.thread)))
            cpu[r.name].append(list(r.baton.cpu_times))
            if inproc_mem:
                peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                        else _peak_rss_mb())
                mem[r.name] = max(mem[r.name], peak - start)
        done += n
        rnd += 1
        elapsed = time.perf_counter() - t0
        if rnd % 5 == 0 or done >= steps:
            log(f"round {rnd}: {done}/{steps} timed steps per runner, {elapsed:.0f} s")
        if done < steps and rnd >= 5 and elapsed * (rnd + 1) / rnd > budget_s:
            log(f"time budget of {budget_s:.0f} s reached: stopping after {done} timed steps per runner")
            stopped = True
            break
    return Timings(wall, cpu, rnd, stopped), mem


def probe_memory(names: list[str], args: argparse.Namespace, workdir: Path, device: torch.device
                 ) -> dict[str, dict[str, Any]]:
    """Peak memory of each runner trained alone in a fresh subprocess (see the module docstring)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> tuple[str, dict[str, Any]]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--workdir", str(workdir),
               "--_probe", name, "--device", str(device), "--steps", str(args.mem_steps)]
        cmd += ["--batch", str(args.batch)] if args.batch else []
        cmd += ["--seq", str(args.seq)] if args.seq else []
        cmd += ["--compile"] if args.compile else []
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            return name, {"error": (proc.stderr or proc.stdout)[-800:]}
        return name, json.loads(lines[-1])

    jobs = 1 if device.type == "cuda" else max(1, min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as pool:
        return dict(pool.map(one, names))


def _preset(args: argparse.Namespace) -> Preset:
    from dataclasses import replace

    preset = PRESETS[args.preset]
    return replace(preset, batch=args.batch or preset.batch, seq=args.seq or preset.seq)


def probe_main(args: argparse.Namespace) -> None:
    """``--_probe NAME``: build one runner alone, train ``--steps`` steps, print its peak memory as JSON."""
    import lightning  # noqa: F401 - every probe imports the same libraries before its baseline
    import peft  # noqa: F401

    if _trl_version() is not None:
        import trl  # noqa: F401
    preset = _preset(args)
    device = torch.device(args.device)
    workdir = Path(args.workdir)
    steps = max(1, args.steps)
    data = build_data(workdir / "model", preset, steps * preset.batch)
    directions_path = workdir / "refusal_param_directions.pt"
    common = Common(preset, workdir / "model", workdir / f"probe-{args._probe}", data, device, steps,
                    directions_path if directions_path.exists() else None, compile=args.compile)
    gc.collect()
    base = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    runner = make_runner(args._probe, common)
    runner.start()
    runner.baton.run(steps, runner.thread)
    peak = _peak_rss_mb()
    out = {"peak_rss_mb": peak, "rss_before_build_mb": base, "peak_above_imports_mb": peak - base,
           "source": "peak RSS (VmHWM) of a process training only this runner"}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    runner.baton.finish(runner.thread)
    print(json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------ reporting
def ratio_keys() -> list[str]:
    """Every throughput ratio the benchmark reports: ``a_vs_b`` = time(b) / time(a)."""
    keys = ["vanilla_vs_plain", "vanilla_vs_trl", "vanilla_vs_vanilla_full"]
    return keys + [f"{m}_{t}_vs_vanilla" for m in PROJECTION_MODES for t in PROJECTION_TARGETS]


def ratios_of(per_round: dict[str, list[list[float]]]) -> dict[str, float]:
    """The ratios whose two runners both ran (``missing_ratios`` says why the others are absent)."""
    out = {}
    for key in ratio_keys():
        a, b = key.split("_vs_")
        if a in per_round and b in per_round:
            out[key] = paired_ratio(per_round, a, b)
    return out


def missing_ratios(present: dict[str, Any], wanted: list[str], skipped: dict[str, str]) -> dict[str, str]:
    """For each ratio whose runners were both asked for but which is absent: why (the skip reasons)."""
    out = {}
    for key in ratio_keys():
        if key in present:
            continue
        a, b = key.split("_vs_")
        if a in wanted and b in wanted:  # asked for, yet absent
            out[key] = "; ".join(f"{n}: {skipped[n]}" for n in (a, b) if n in skipped) or "not measured"
    return out


def memory_ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Peak RSS of vanilla / plain, whole process and above the imports (the libraries every probe loads)."""
    out = {}
    a, b = runs.get("vanilla", {}), runs.get("plain", {})
    if a.get("peak_rss_mb") and b.get("peak_rss_mb"):
        out["vanilla_vs_plain"] = a["peak_rss_mb"] / b["peak_rss_mb"]
    if a.get("peak_rss_above_imports_mb") and b.get("peak_rss_above_imports_mb"):
        out["vanilla_vs_plain_above_imports"] = a["peak_rss_above_imports_mb"] / b["peak_rss_above_imports_mb"]
    return out


def _quotient(runs: dict[str, dict[str, Any]], key: str) -> float | None:
    """``key`` (``a_vs_b``) as the quotient of the two runs' median-based tokens/s."""
    a, b = key.split("_vs_")
    if a in runs and b in runs:
        return runs[a]["tokens_per_s"] / runs[b]["tokens_per_s"]
    return None


def targets_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issues' targets for the ratios this run measured (absent ones: see ``missing``)."""
    ratios, vocab = result["ratios"], result["settings"].get("vocab_size") is not None
    rows = [("vanilla_vs_plain", ratios.get("vanilla_vs_plain"), VOCAB_PLAIN_TARGET if vocab else PLAIN_TARGET, ">="),
            ("vanilla_vs_trl", ratios.get("vanilla_vs_trl"), TRL_TARGET, ">=")]
    if vocab:
        rows.append(("peak_rss_vanilla_vs_plain", result["mem_ratios"].get("vanilla_vs_plain"), VOCAB_MEM_TARGET,
                     "<="))
    for m in PROJECTION_MODES:
        for t in PROJECTION_TARGETS:
            key = f"{m}_{t}_vs_vanilla"
            rows.append((key, ratios.get(key), GRAD_TARGET if t == "grad" else UPDATE_TARGET, ">="))
    rows.append(("padding_efficiency", result["padding_efficiency"], PADDING_TARGET, ">="))
    rows.append(("directions_mem_ratio", result.get("directions_mem_ratio"), DIRECTIONS_MEM_TARGET, "<="))
    out = []
    for key, value, target, op in rows:
        if value is None:
            continue
        met = value >= target if op == ">=" else value <= target
        out.append({"metric": key, "value": value, "target": f"{op} {target}", "met": met})
    return out


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(result: dict[str, Any]) -> str:
    p, m = result["settings"], result["machine"]
    lines = [
        f"### Preset `{result['preset']}`",
        "",
        f"Model: Qwen3 architecture, {p['num_layers']} layers x {p['hidden_size']}"
        + (f", vocabulary {p['vocab_size']:,}" if p.get("vocab_size") else "")
        + f", random weights; LoRA r={LORA_R} "
        f"alpha={LORA_ALPHA:g} dropout={LORA_DROPOUT} on all linear layers; batch {p['batch']} x {p['seq']} tokens "
        f"(no padding), {p['precision']}, AdamW lr {LR:g}, clip {CLIP:g}; {p['warmup']} warmup + {p['steps']} timed "
        f"steps per runner, interleaved {p['steps_per_round']} step(s) per runner per round; "
        f"torch.compile {'on' if p.get('compile') else 'off'} in every runner.",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), device `{m['device']}`"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f"; torch {m['torch']}, lightning {m['lightning']}, transformers {m['transformers']}, peft {m['peft']}, "
        f"trl {m['trl'] or 'not installed'}.",
        "",
        f"Command: `{result['command']}`",
        "",
        "Ratios (`vs vanilla` and the targets) are medians over rounds of paired per-round step-time ratios;",
        f"{result['rounds']} rounds{' (stopped by the time budget)' if result['stopped_by_budget'] else ''}, "
        f"1-min load average {result['loadavg_1min_before_after'][0]:.1f} before / "
        f"{result['loadavg_1min_before_after'][1]:.1f} after the timed rounds.",
        "",
        "| runner | tokens/s | median step (ms) | p10-p90 step (ms) | peak RSS (MB) | vs vanilla |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["runs"].items():
        rel = r.get("vs_vanilla")
        lines.append(f"| {name} | {_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['step_s_median'] * 1e3, '.1f')} | "
                     f"{_fmt(r['step_s_p10'] * 1e3, '.0f')}-{_fmt(r['step_s_p90'] * 1e3, '.0f')} | "
                     f"{_fmt(r.get('peak_rss_mb'), ',.0f')} | {_fmt(rel, '.3f')} |")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} | | | | |")
    mem = result.get("mem_ratios", {})
    lines += ["", f"Peak memory: {result.get('peak_mem_source', 'n/a')}."
              + (f" vanilla / plain: {mem['vanilla_vs_plain']:.3f}" if "vanilla_vs_plain" in mem else "")
              + (f" ({mem['vanilla_vs_plain_above_imports']:.3f} above the imports)."
                 if "vanilla_vs_plain_above_imports" in mem else ""),
              "", "| target | value | wanted | met |", "|---|---:|---:|:---:|"]
    for t in result["targets"]:
        lines.append(f"| {t['metric']} | {_fmt(t['value'])} | {t['target']} | {'yes' if t['met'] else '**no**'} |")
    for key, why in result.get("missing", {}).items():
        lines.append(f"| {key} | missing: {why} | | |")
    pad = result["padding"]
    lines += ["", f"Padding efficiency of the bundled sample at batch {pad['batch_size']} (non-pad / padded tokens): "
              f"red {pad['red']['grouped']:.3f} with length grouping ({pad['red']['ungrouped']:.3f} without), "
              f"blue {pad['blue']['grouped']:.3f} ({pad['blue']['ungrouped']:.3f}). "
              f"Directions held in memory / LoRA parameters: "
              + ", ".join(f"{k} {v:.2f}" for k, v in result.get("directions_mem_ratio_by_run", {}).items()) + ".",
              ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench/train.json"), help="JSON result file")
    ap.add_argument("--md", type=Path, default=None, help="markdown table (default: --out with .md)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per runner (preset default)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per runner first (preset default)")
    ap.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    ap.add_argument("--seq", type=int, default=None, help="override the preset's sequence length")
    ap.add_argument("--steps-per-round", type=int, default=None, help="steps per runner per interleaved round")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop the timed rounds early once this many seconds are spent (preset default)")
    ap.add_argument("--runners", default=None,
                    help=f"comma-separated subset of {','.join(ALL_RUNNERS + EXTRA_RUNNERS)} (default: the preset's; "
                    "cpu-vocab: plain,vanilla,trl; others: all but vanilla_full)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model in every runner (plain; our module's compile key; TRL's "
                    "torch_compile)")
    ap.add_argument("--mem", choices=("probe", "inproc", "off"), default="probe",
                    help="peak memory: one subprocess per runner (probe), in this process (inproc), or none")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps each memory probe trains")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda for GPU presets when available)")
    ap.add_argument("--workdir", type=Path, default=None, help="model/adapter scratch folder (default: temporary)")
    ap.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import lightning  # noqa: F401 - it sets its loggers' levels on import; quiet them after that

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "trl", "peft", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    if args._probe:
        probe_main(args)
        return {}
    t_start = time.perf_counter()
    preset = _preset(args)
    device = torch.device(args.device or ("cuda" if preset.gpu and torch.cuda.is_available() else "cpu"))
    if preset.gpu and device.type != "cuda":
        log(f"preset {args.preset} is meant for a GPU; running it on {device} in bf16 will be very slow")
    warmup = preset.warmup if args.warmup is None else args.warmup
    steps = preset.steps if args.steps is None else args.steps
    per_round = preset.steps_per_round if args.steps_per_round is None else args.steps_per_round
    if steps < 1 or warmup < 0 or per_round < 1:
        raise SystemExit("--steps and --steps-per-round must be >= 1, --warmup >= 0")
    if args.runners is None:
        wanted = list(preset.runners or ALL_RUNNERS)
    else:
        wanted = [n.strip() for n in args.runners.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(ALL_RUNNERS + EXTRA_RUNNERS))
    if unknown:
        raise SystemExit(f"unknown runners {unknown}; choose from {', '.join(ALL_RUNNERS + EXTRA_RUNNERS)}")

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_train-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    total = warmup + steps
    log(f"preset {args.preset} on {device}: building model and data in {workdir}")
    model_dir = build_base_model(preset, workdir / "model", device)
    data = build_data(model_dir, preset, total * preset.batch)
    tokens_per_step = preset.batch * preset.seq

    directions_path = None
    if any(n not in BASIC_RUNNERS for n in wanted):
        try:
            directions_path = make_directions(model_dir, workdir, "bfloat16" if preset.gpu else "float32")
        except Exception as exc:  # noqa: BLE001 - projection code missing/broken: report, measure the rest
            for n in wanted:
                if n not in BASIC_RUNNERS:
                    skipped[n] = f"directions could not be made: {type(exc).__name__}: {exc}"
    if "trl" in wanted and _trl_version() is None:
        skipped["trl"] = "trl is not importable (pip install -c constraints.txt 'refusal_lightning[bench]')"
    common = Common(preset, model_dir, workdir, data, device, total, directions_path, compile=args.compile)

    runners: list[Runner] = []
    for name in wanted:
        if name in skipped:
            continue
        torch.manual_seed(0)  # the same LoRA init everywhere
        try:
            runner = make_runner(name, common)
            runner.start()
        except Exception as exc:  # noqa: BLE001 - one broken runner must not hide the others' numbers
            skipped[name] = f"{type(exc).__name__}: {exc}"
            log(f"runner {name} skipped: {skipped[name]}")
            continue
        runners.append(runner)
        log(f"runner {name} ready ({runner.lora_params:,} LoRA parameters)")
    for name, why in skipped.items():
        log(f"SKIPPED {name}: {why}")
    if not runners:
        raise SystemExit("no runner could be built")

    # Setup objects (models, modules, tokenizers) move to the permanent GC generation, so the collector's
    # full passes during the timed steps do not walk every runner's object graph.
    gc.collect()
    gc.freeze()
    load_before = os.getloadavg()
    t_timing = time.perf_counter()
    budget = preset.budget_s if args.budget_s is None else args.budget_s
    timings, inproc = run_interleaved(runners, warmup, steps, per_round, device, args.mem == "inproc", budget)
    timing_s = time.perf_counter() - t_timing
    load_after = os.getloadavg()
    for r in runners:
        r.baton.finish(r.thread)
    gc.unfreeze()

    runs: dict[str, dict[str, Any]] = {}
    for r in runners:
        runs[r.name] = {**summarise(timings.wall[r.name], timings.cpu[r.name], tokens_per_step),
                        "vs_vanilla": paired_ratio(timings.wall, r.name, "vanilla"),
                        "peak_rss_mb": None, "lora_params": r.lora_params}
        if args.mem == "inproc":
            runs[r.name]["peak_rss_mb"] = inproc[r.name]
    ratio_by_run = {r.name: held_tensor_elements(r.projector) / r.lora_params
                    for r in runners if r.projector is not None}
    peak_source = {"probe": ("one subprocess per runner; peak RSS (VmHWM), libraries included"
                             + ("; peak_cuda_mb: torch.cuda.max_memory_allocated" if device.type == "cuda" else "")),
                   "inproc": "in-process peak above the memory held when the runner's round started",
                   "off": "not measured (--mem off)"}[args.mem]
    del runners
    gc.collect()
    if args.mem == "probe":
        log("memory pass: one subprocess per runner")
        probes = probe_memory(list(runs), args, workdir, device)
        for name, res in probes.items():
            runs[name]["peak_rss_mb"] = res.get("peak_rss_mb")
            if "error" in res:
                runs[name]["peak_mem_error"] = res["error"]
            else:
                runs[name]["peak_rss_above_imports_mb"] = res["peak_above_imports_mb"]
            if "peak_cuda_mb" in res:
                runs[name]["peak_cuda_mb"] = res["peak_cuda_mb"]

    ratios = ratios_of(timings.wall)
    missing = {name: f"runner skipped: {why}" for name, why in skipped.items()}
    missing |= {f"ratios.{k}": why for k, why in missing_ratios(ratios, wanted, skipped).items()}
    peak_rss = {}
    for name in wanted:
        if runs.get(name, {}).get("peak_rss_mb"):
            peak_rss[name] = runs[name]["peak_rss_mb"]
        elif name in skipped:
            missing[f"peak_rss_mb.{name}"] = f"runner skipped: {skipped[name]}"
        elif args.mem == "off":
            missing[f"peak_rss_mb.{name}"] = "not measured (--mem off)"
        else:
            missing[f"peak_rss_mb.{name}"] = "memory probe failed: " + runs.get(name, {}).get("peak_mem_error", "?")

    result: dict[str, Any] = {
        "preset": args.preset,
        "machine": machine_info(device),
        "runs": runs,
        "ratios": ratios,
        "ratio_method": "median over interleaved rounds of the paired ratio time(reference) / time(runner)",
        "ratios_of_medians": {k: _quotient(runs, k) for k in ratios},
        "peak_rss_mb": peak_rss,
        "mem_ratios": memory_ratios(runs),
        "missing": missing,
        "ratios_cpu_time": ratios_of(timings.cpu),
        "padding_efficiency": data.padding[THREAD]["grouped"],
        "directions_mem_ratio": max(ratio_by_run.values()) if ratio_by_run else None,
        "directions_mem_ratio_by_run": ratio_by_run,
        "padding": data.padding,
        "skipped": skipped,
        "peak_mem_source": peak_source,
        "tokens_per_step": tokens_per_step,
        "settings": {**asdict(preset), "warmup": warmup, "steps": steps, "steps_per_round": per_round,
                     "runners": wanted, "compile": args.compile,
                     "precision": "bf16-mixed (bf16 base, fp32 LoRA)" if preset.gpu else "fp32",
                     "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "targets": "all linear"},
                     "optimizer": f"AdamW lr={LR} wd=0 (unfused), constant LR, grad clip {CLIP}",
                     "log_every_n_steps": LOG_EVERY, "data_thread": THREAD},
        "command": "python scripts/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "timing_s": timing_s,
        "rounds": timings.rounds,
        "stopped_by_budget": timings.stopped_by_budget,
        "loadavg_1min_before_after": [load_before[0], load_after[0]],
        "wall_s": time.perf_counter() - t_start,
    }
    result["targets"] = targets_of(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md_path = args.md or args.out.with_suffix(".md")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown(result))
    log(f"wrote {args.out} and {md_path} in {result['wall_s']:.0f} s")
    print(markdown(result))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
