"""The LightningModule: a PEFT LoRA model, one shared step, logging, and the projection hooks."""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric, SumMetric

from refusal_lightning.defences.activation_guard import STATE_FILE as GUARD_FILE
from refusal_lightning.defences.activation_guard import ActGuardConfig, ActivationGuard, build_guard
from refusal_lightning.defences.asft import AsftConfig, build_asft_penalty
from refusal_lightning.defences.directions import ADAPTER_NAME, build_projector
from refusal_lightning.defences.lox import LoxConfig, lox_adapter_above
from refusal_lightning.defences.projection import ProjectionConfig
from refusal_lightning.files import move_files_into
from refusal_lightning.legacy import old_paths
from refusal_lightning.models.loading import check_adapter_dir, load_causal_lm
from refusal_lightning.models.stacking import COMBINED_DIR, WEIGHTS_FILE, combine_adapters
from refusal_lightning.train.chunked_loss import (
    DEFAULT_CHUNK_SIZE,
    check_loss_impl,
    decoder_and_head,
    liger_next_token_loss,
    next_token_loss,
    next_token_loss_and_hits,
    per_example_loss,
    shift_labels,
)
from refusal_lightning.train.retain import RetainConfig, check_retain_config, load_retain_prompts
from refusal_lightning.train.retain_answers import CACHE_FILE, RetainBatches, cached_base_answers
from refusal_lightning.train.retain_loss import next_token_kl, next_token_kl_from_logits

STEPS_DIR = "steps"  # <output_dir>/steps/<step>/: the adapter after that many optimizer steps (trajectory_steps)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRASettings:
    """LoRA hyperparameters (PEFT ``LoraConfig``)."""

    r: int = 8
    """Rank: higher fits more, costs memory; attack and refusal ranks must match for ``lora_param`` mode."""
    alpha: float = 16.0
    """Scale numerator: the update is ``alpha / r * B A``."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    """Module names that get a LoRA (Qwen3: all linear layers by default)."""
    use_rslora: bool = False
    """Rank-stabilised scale ``alpha / sqrt(r)``."""
    layers_to_transform: list[int] | None = None
    """Decoder layer indices that get a LoRA (default: all). The top layers only: a shorter backward pass."""


# A module built in Python (not by the CLI) pickles these into its checkpoint's ``hyper_parameters``, and
# Lightning loads checkpoints with ``weights_only=True``, which refuses classes it was not told are safe:
# without this such a checkpoint cannot be resumed. Their pre-subpackage paths too (``legacy``).
HPARAM_CLASSES = (LoRASettings, ProjectionConfig, AsftConfig, LoxConfig, RetainConfig, ActGuardConfig)
torch.serialization.add_safe_globals([*HPARAM_CLASSES, *((c, path) for c in HPARAM_CLASSES for path in old_paths(c))])


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)


def _per_stage_means() -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({stage: MeanMetric(nan_strategy="disable") for stage in ("val", "test")})


def stack_frozen_adapters(base: torch.nn.Module, frozen: list[str], config: Any) -> torch.nn.Module:
    """``base`` + ``frozen`` LoRA adapters (unmerged, no grad, no dropout) + a new trainable ``default`` LoRA.

    All adapters are active at once, so the forward pass is ``W0 x + sum_i s_i B_i A_i x``: the model the
    combined adapter (``stacking.combine_adapters``) reproduces on the plain base.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = [f"frozen_{i}" for i in range(len(frozen))]
    model = PeftModel.from_pretrained(base, frozen[0], adapter_name=names[0], is_trainable=False)
    for name, path in zip(names[1:], frozen[1:], strict=True):
        model.load_adapter(path, adapter_name=name, is_trainable=False)
    model.add_adapter(ADAPTER_NAME, config)
    model.base_model.set_adapter([*names, ADAPTER_NAME])  # PEFT marks every active adapter trainable
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in names:
                if name in module.lora_A:
                    module.lora_A[name].requires_grad_(False)
                    module.lora_B[name].requires_grad_(False)
                    module.lora_dropout[name] = torch.nn.Identity()  # evaluation applies them without dropout
    return model


class TrajectoryStepsError(ValueError):
    """``model.trajectory_steps`` names a step that cannot be exported."""


class RefusalLoRAModule(L.LightningModule):
    """Causal-LM LoRA fine-tuning on chat pairs, with optional refusal-direction projection."""

    def __init__(
        self,
        model_name_or_path: str = "Qwen/Qwen3-0.6B",
        output_dir: str = "artifacts/refusal_lora",
        lora: LoRASettings = LoRASettings(),
        merge_adapters: list[str] | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        optimizer: OptimizerCallable = _default_optimizer,
        warmup_steps: int = 0,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        min_lr_ratio: float = 0.1,
        projection: ProjectionConfig = ProjectionConfig(),
        asft: AsftConfig = AsftConfig(),
        lox: LoxConfig = LoxConfig(),
        retain: RetainConfig = RetainConfig(),
        act_guard: ActGuardConfig = ActGuardConfig(),
        compile: bool = False,
        loss_impl: Literal["chunked", "full", "liger"] = "chunked",
        loss_chunk_size: int = DEFAULT_CHUNK_SIZE,
        trajectory_steps: list[int] | None = None,
    ):
        """
        Args:
            model_name_or_path: base model: a hub id (``Qwen/Qwen3-0.6B``) or a local folder.
            output_dir: where the adapter (``save_pretrained``), ``config.yaml``, ``data_stats.json`` and
                ``projection_stats.json`` are written, at each checkpoint and at the end of fit.
            lora: LoRA hyperparameters of the adapter being trained.
            merge_adapters: adapter folders applied beneath the new LoRA, frozen and unmerged (the attacks
                train on base + refusal LoRA). Unmerged, they act exactly as a server applies them, in
                any base dtype (a bf16 merge would round most of a small refusal update away). With
                these set, the export also writes ``output_dir/combined``: one adapter equal to all of
                them plus the trained one, which is the model to evaluate on the plain base.
            dtype: dtype of the frozen base weights (LoRA weights stay float32); use ``bfloat16`` on GPUs.
            gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
            optimizer: optimizer factory over the trainable (LoRA) parameters, e.g.
                ``{class_path: torch.optim.AdamW, init_args: {lr: 2.0e-4}}``.
            warmup_steps: linear warmup steps of the LR schedule.
            lr_schedule: ``cosine`` decay to ``min_lr_ratio * lr`` after warmup, or ``constant``.
            min_lr_ratio: final LR as a fraction of the peak for ``cosine``.
            projection: refusal-direction projection and monitoring (see projection.py).
            asft: the AsFT baseline (arXiv 2506.08473): ``lam * sum ||(I - C) B A||_F^2`` over the trained LoRA,
                with ``C`` from the refusal update, added to the training loss (see asft.py).
            lox: the LoX baseline (arXiv 2506.15606): the refusal LoRA's update (the last of ``merge_adapters``)
                extrapolated along its top-``k`` singular directions, ``alpha * P_k(dW_r)``, before the attack;
                writes ``output_dir/lox_extrapolation`` and stacks it, frozen, above the ``merge_adapters``
                (so ``combined/`` includes it; see lox.py).
            retain: a second loss on benign prompts that keeps the base model's behaviour there while the
                LoRA trains: KL to the base (adapter disabled) or distillation of the base's own answers
                (see retain.py). Off by default; off, the fit is unchanged.
            act_guard: the activation-space defence: ``lam`` times the squared change of the defender's harmful
                probe prompts' projection on the refusal direction, read on the starting model at fit start
                and kept in ``output_dir/act_guard.pt`` (see activation_guard.py). Off by default.
            compile: ``torch.compile`` the model (first steps are slow; pays off on long GPU runs).
            loss_impl: how the reply-token cross-entropy goes through the LM head. ``chunked``: only the
                labelled tokens, ``loss_chunk_size`` at a time, never the ``tokens x vocab`` logits
                (chunked_loss.py; equal to ``full``). ``full``: the model's own loss over full logits
                (at Qwen3's 151,936 vocabulary ~1.2 GB of fp32 logits per 4 x 512 batch, plus their
                gradient). ``liger``: Liger-Kernel's fused linear cross-entropy (CUDA; ``pip install
                liger-kernel``). ``chunked`` and ``liger`` need a plain linear head (no LoRA on ``lm_head``).
            loss_chunk_size: tokens per chunk of ``chunked``: memory holds ``loss_chunk_size x vocab`` fp32
                logits at once (512 x 151,936: 311 MB); larger chunks run slightly faster.
            trajectory_steps: after each of these optimizer steps, also export the adapter (with its
                ``combined/`` and ``projection_stats.json``) into ``output_dir/steps/<step>/``: the attack's
                trajectory (``sweep``). A snapshot already written is kept (a resumed fit does not redo it);
                steps beyond ``max_steps`` never come. Step 0 is the starting model and is not exported.
        """
        super().__init__()
        check_retain_config(retain, merge_adapters)  # a bad retain section fails before the model loads
        self.save_hyperparameters(ignore=["optimizer"])
        self.output_dir = Path(output_dir)
        self.lora = lora
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule
        self.min_lr_ratio = min_lr_ratio
        self.projection = projection
        self.retain = retain
        self.act_guard = act_guard
        self.guard: ActivationGuard | None = None  # built at fit start (needs the datamodule's prompts)
        self.model_name_or_path = model_name_or_path
        if any(step < 1 for step in trajectory_steps or []):
            raise TrajectoryStepsError(f"trajectory_steps are optimizer steps >= 1 (step 0 is the starting model), got "
                             f"{trajectory_steps}")
        self.trajectory_steps = frozenset(trajectory_steps or [])
        self.retain_batches: RetainBatches | None = None  # built at fit start (needs the datamodule's tokenizer)
        self.retain_stats: dict = {}
        # Frozen weights are reloaded from model_name_or_path; checkpoints hold trainable weights only.
        self.strict_loading = False
        self.frozen_adapters = [str(check_adapter_dir(a)) for a in merge_adapters or []]
        if lox.enabled:  # training-free: the extrapolation is written now and applied like any frozen adapter
            self.frozen_adapters.append(str(lox_adapter_above(lox, self.frozen_adapters, self.output_dir)))
        # LoX changes the starting model: the trajectory's step 0 is then this fit's own, exported at fit start
        self.own_start = lox.enabled
        self.model = self._build_peft_model(model_name_or_path, self.frozen_adapters, dtype, gradient_checkpointing)
        # from_pretrained returns eval mode and Lightning keeps a module's mode: LoRA dropout needs train().
        self.model.train()
        if compile:
            self.model = torch.compile(self.model)
        self.loss_impl, self.loss_chunk_size = loss_impl, loss_chunk_size
        if loss_impl != "full":  # a head the chunked loss cannot reproduce fails here, not at step 1
            check_loss_impl(self.model, loss_impl, loss_chunk_size)
        self._compile_decoder = compile
        self._decoder_forward = None  # the decoder's forward, compiled when `compile` is set (chunked/liger)
        # None without a directions file; raises (listing every problem) on a bad one, before any step.
        self.projector = build_projector(projection, self.model, base_model_name=model_name_or_path,
                                         base_adapters=self.frozen_adapters)
        # None unless asft.enabled; raises (listing every problem) on bad directions, before any step.
        self.asft_penalty = build_asft_penalty(asft, self.model, base_model_name=model_name_or_path,
                                               base_adapters=self.frozen_adapters,
                                               default_directions_path=projection.directions_path)
        # torchmetrics states, summed over DDP ranks when computed (nan checks off: each would sync per step).
        self.train_tokens = SumMetric(nan_strategy="disable")  # non-pad tokens since the last log step
        self.eval_nll, self.eval_token_accuracy = _per_stage_means(), _per_stage_means()  # val/test
        self._last_log_time: float | None = None

    def _build_peft_model(self, name: str, frozen: list[str], dtype: str, checkpointing: bool):
        from peft import LoraConfig, get_peft_model

        base = load_causal_lm(name, dtype=dtype)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        config = LoraConfig(r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                            target_modules=list(self.lora.target_modules), use_rslora=self.lora.use_rslora,
                            layers_to_transform=self.lora.layers_to_transform, task_type="CAUSAL_LM")
        if not frozen:
            return get_peft_model(base, config, adapter_name=ADAPTER_NAME)
        return stack_frozen_adapters(base, frozen, config)

    # ----------------------------------------------------------------------------------- the step
    def _final_hidden(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.nn.Linear]:
        """The decoder's last hidden states (after its final norm) and the LM head, which the chunked and
        fused losses apply themselves: calling the whole model would build the full logits."""
        decoder, head = decoder_and_head(self.model)
        if self._decoder_forward is None:
            # A compiled bound method, not a module: nothing extra is registered in the state dict.
            self._decoder_forward = torch.compile(decoder.forward) if self._compile_decoder else decoder.forward
        out = self._decoder_forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False)
        return out.last_hidden_state, head

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the reply tokens (labels != -100, shifted as Hugging Face does)."""
        return self._loss_and_hits(batch, hits=False)[0]

    def _loss_and_hits(self, batch: dict[str, torch.Tensor], hits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``_loss`` and, with ``hits``, whether each reply token is the model's argmax prediction (token
        accuracy, from the same forward pass)."""
        labels = batch["labels"]
        if self.loss_impl == "full":
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
            if not hits:
                return out.loss, None
            logits, targets, _ = shift_labels(out.logits, labels)
            return out.loss, logits.argmax(-1) == targets
        hidden, head = self._final_hidden(batch)
        if hits:  # evaluation: one chunked pass over the head gives both (liger too: no gradient is needed)
            return next_token_loss_and_hits(hidden, labels, head.weight, head.bias, self.loss_chunk_size)
        if self.loss_impl == "liger":
            return liger_next_token_loss(hidden, labels, head.weight, head.bias), None
        return next_token_loss(hidden, labels, head.weight, head.bias, self.loss_chunk_size), None

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        n = batch["input_ids"].shape[0]
        if stage == "train":
            loss = self._loss(batch)
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n, sync_dist=False)
            return loss
        loss, hits = self._loss_and_hits(batch, hits=True)
        # torchmetrics objects: Lightning computes them over every DDP rank at the epoch's end.
        # val/loss weighs each batch mean by its rows, as it always has (one copy per row: MeanMetric drops
        # `weight` when its nan checks are off)
        self.eval_nll[stage].update(loss.detach().expand(n))
        self.eval_token_accuracy[stage].update(hits.float())
        self.log(f"{stage}/loss", self.eval_nll[stage], prog_bar=True, on_step=False, on_epoch=True)
        self.log(f"{stage}/token_accuracy", self.eval_token_accuracy[stage], on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Non-pad tokens stay on the device; they are read (one sync) only at log steps.
        self.train_tokens.update(batch["attention_mask"].sum())
        loss = self._shared_step(batch, "train")
        if self.asft_penalty is not None:  # AsFT: a parameter-only term; train/loss stays the task loss
            penalty = self.asft_penalty()
            self.log("asft/penalty", penalty, on_step=True, batch_size=batch["input_ids"].shape[0])
            loss = loss + penalty
        if self.retain_batches is not None:  # train/loss stays the task loss; the term is logged apart
            retain_batch = self.retain_batches.batch(self.global_step, batch_idx, self.device)
            # The retain pass draws its own LoRA-dropout masks without moving the global RNG, so the task
            # batches see the same masks with the term on or off (weight 0 reproduces the fit without it).
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                retain_loss = self.retain_loss(retain_batch)
            self.log("retain/loss", retain_loss, on_step=True, batch_size=retain_batch["input_ids"].shape[0])
            loss = loss + self.retain.weight * retain_loss
        if self.guard is not None:  # train/loss stays the task loss; its own dropout masks, as for retain
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                penalty, projection = self.guard.term(self.model, self.global_step)
            n = self.guard.batch_size
            self.log("act_guard/penalty", penalty, on_step=True, batch_size=n)
            self.log("act_guard/projection", projection, on_step=True, batch_size=n)
            loss = loss + self.act_guard.lam * penalty
        return loss

    def retain_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The retain loss on a batch of retain rows (labels on the base model's answers): ``kl`` to the base
        model, run with the trained adapter disabled in the same step, or ``distill`` (cross-entropy on the
        base's greedy answers). Gradients reach only the trained LoRA: the base pass runs without grad."""
        if self.retain.kind == "distill":
            return self._loss(batch)
        peft_model = getattr(self.model, "_orig_mod", self.model)
        if self.loss_impl == "full":  # the model's own head (whatever wraps it), full logits
            def logits() -> torch.Tensor:
                return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

            student = logits()
            with torch.no_grad(), peft_model.disable_adapter():
                teacher = logits()
            return next_token_kl_from_logits(student, teacher, batch["labels"])
        hidden, head = self._final_hidden(batch)
        with torch.no_grad(), peft_model.disable_adapter():
            base_hidden, _ = self._final_hidden(batch)
        return next_token_kl(hidden, base_hidden, batch["labels"], head.weight, head.bias, self.loss_chunk_size)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-example mean reply-token loss (a likelihood score for each held-out pair)."""
        if self.loss_impl == "full":
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels,
                                                    ignore_index=-100, reduction="none")
            counts = (labels != -100).sum(1).clamp(min=1)
            return {"reply_loss": nll.sum(1) / counts}
        # liger scores with the chunked loss too: no gradient is needed here
        hidden, head = self._final_hidden(batch)
        return {"reply_loss": per_example_loss(hidden, batch["labels"], head.weight, head.bias,
                                               self.loss_chunk_size)}

    def _is_log_step(self) -> bool:
        return self.global_step % max(1, self.trainer.log_every_n_steps) == 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimizer steps; with gradient accumulation several micro-batches share one
        snapshot = self.output_dir / STEPS_DIR / str(self.global_step)
        if self.global_step in self.trajectory_steps and not (snapshot / WEIGHTS_FILE).exists():
            self.export(snapshot)
        if not self._is_log_step():
            return
        now = time.perf_counter()
        if self._last_log_time is not None:
            # every rank reaches this step: compute() sums the ranks' counts; float() syncs, once per log interval
            tokens = float(self.train_tokens.compute())
            self.log("tokens_per_s", tokens / max(now - self._last_log_time, 1e-9))
        self.train_tokens.reset()
        self._last_log_time = now
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        if self.projector is not None:
            self.log_dict(self.projector.drift())

    # ----------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, floor, schedule = self.warmup_steps, self.min_lr_ratio, self.lr_schedule

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _build_retain_batches(self) -> None:
        """Retain prompts -> the base model's cached answers -> ``self.retain_batches`` (fit start: the model
        is on its device, and the datamodule holds the tokenizer and chat-template settings)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "load_tokenizer"):
            raise ValueError("retain.enabled needs the fit's HarmfulQADataModule (its tokenizer and chat template)")
        tokenizer = datamodule.load_tokenizer()
        prompts, self.retain_stats = load_retain_prompts(self.retain)
        max_prompt_tokens = max(1, datamodule.max_length - self.retain.max_new_tokens)
        prompt_ids, answer_ids = cached_base_answers(
            self.output_dir / CACHE_FILE, getattr(self.model, "_orig_mod", self.model), tokenizer, prompts,
            self.model_name_or_path, self.retain.max_new_tokens, max_prompt_tokens, datamodule.template_kwargs,
            write=self.trainer.is_global_zero)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.retain_batches = RetainBatches(prompt_ids, answer_ids, self.retain.batch_size, pad, self.retain.seed)
        self.retain_stats["rows_with_answer"] = len(self.retain_batches)
        self.retain_stats["answer_tokens"] = sum(len(a) for a in answer_ids)

    def _build_guard(self) -> None:
        """The activation guard from the datamodule's defender half and tokenizer (fit start, before step 1)."""
        from peft.tuners.lora import LoraLayer

        from refusal_lightning.train.harmfulqa import defender_questions

        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "load_tokenizer"):
            raise ValueError("act_guard.enabled needs the fit's HarmfulQADataModule (its defender half and tokenizer)")
        peft_model = getattr(self.model, "_orig_mod", self.model)
        at_init = all(not m.lora_B[ADAPTER_NAME].weight.any() for m in peft_model.modules()
                      if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_B)
        layers = self.lora.layers_to_transform
        allowed = list(layers) if layers else list(range(peft_model.config.num_hidden_layers))
        self.guard = build_guard(self.act_guard, peft_model, datamodule.load_tokenizer(),
                                 defender_questions(datamodule.source, datamodule.val_fraction, datamodule.seed),
                                 allowed, self.output_dir / GUARD_FILE, datamodule.template_kwargs,
                                 starting_model=at_init)

    def on_fit_start(self) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if self.retain.enabled and self.retain_batches is None:
            self._build_retain_batches()
        if self.act_guard.enabled and self.guard is None:
            self._build_guard()
        start = self.output_dir / STEPS_DIR / "0"
        if self.own_start and self.trajectory_steps and self.global_step == 0 and not (start / WEIGHTS_FILE).exists():
            self.export(start)  # the attack LoRA is still zero: base + frozen adapters (the sweep's step 0)

        if self.asft_penalty is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError("the AsFT term needs whole LoRA tensors; FSDP shards them: use DDP (LoRA weights "
                             "are small) or asft.enabled=false")
        if self.projector is None:
            return
        self.projector.to_(self.device)
        from lightning.pytorch.strategies import FSDPStrategy

        if self.projection.enabled and isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError("the refusal projection needs whole LoRA tensors; FSDP shards them: use DDP "
                             "(LoRA weights are small) or projection.enabled=false")
        if self.projection.enabled and self.projection.target == "grad":
            from lightning.pytorch.plugins.precision import MixedPrecision
            from torch.optim.optimizer import Optimizer

            plugin = self.trainer.precision_plugin
            scaled = isinstance(plugin, MixedPrecision) and plugin.scaler is not None
            for opt in self.trainer.optimizers:
                fused = isinstance(opt, Optimizer) and any(g.get("fused") for g in opt.param_groups)
                if scaled and fused:
                    raise ValueError(
                        f"projection target 'grad' with a fused {type(opt).__name__} under 16-mixed: its "
                        "gradients are still loss-scaled in on_before_optimizer_step; use fused=False, "
                        "bf16-mixed, or projection.target=update"
                    )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this after AMP unscaling and gradient accumulation, before clipping.
        log_step = self._is_log_step()
        if self.projector is not None:
            # target "update" projects the gradient too, so Adam's moments are fed what the parameters
            # may follow; the update projection then removes what Adam's per-coordinate scaling re-adds.
            stats = self.projector.project_grads_(apply=self.projection.enabled)
            if log_step:
                self.log_dict(stats)
        if log_step:  # the norm is reported after projection, as the optimizer sees it
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                self.log("grad_norm", torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        project_update = self.projector is not None and self.projection.enabled and self.projection.target == "update"
        if project_update:
            self.projector.snapshot_()
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if project_update:
            stats = self.projector.project_update_(apply=True)
            if self._is_log_step():
                self.log_dict({f"update/{k.split('/')[-1]}": v for k, v in stats.items()})

    # ------------------------------------------------------------------------------- artefacts
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self.projector is not None:  # running removed-fraction statistics survive a resume
            checkpoint["projector"] = self.projector.state_dict()
        self.export()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.projector is not None and "projector" in checkpoint:
            self.projector.load_state_dict(checkpoint["projector"])

    def on_fit_end(self) -> None:
        self.export()

    def export(self, output_dir: Path | None = None) -> None:
        """Write the adapter and run records into ``output_dir`` (default: the fit's; rank zero; files
        replaced atomically)."""
        if self._trainer is None or not self.trainer.is_global_zero:
            return
        output_dir = output_dir or self.output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=".export-") as tmp:
            staging = Path(tmp)
            model = self.model._orig_mod if hasattr(self.model, "_orig_mod") else self.model
            model.save_pretrained(staging, selected_adapters=[ADAPTER_NAME])
            (staging / "README.md").unlink(missing_ok=True)  # PEFT's stub card; `push` writes a real one
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is not None and getattr(datamodule, "stats", None):
                datamodule.write_stats(staging)
            if self.projector is not None:
                summary = {"config": asdict(self.projection), **self.projector.summary(),
                           "drift/cos_chance": self.projector.chance_cos()}
                (staging / "projection_stats.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
            if self.guard is not None:  # the guarded layer and scale beside the adapter
                record = {"config": asdict(self.act_guard), **self.guard.state.summary()}
                (staging / "act_guard_stats.json").write_text(json.dumps(record, indent=2) + "\n")
            if self.retain_stats:  # which retain prompts, and with which setting, beside the adapter
                record = {"config": asdict(self.retain), **self.retain_stats}
                (staging / "retain_stats.json").write_text(json.dumps(record, indent=2) + "\n")
            if self.frozen_adapters:  # what was trained: base + frozen adapters + this one, as one adapter
                combine_adapters([*self.frozen_adapters, staging], staging / COMBINED_DIR)
            move_files_into(staging, output_dir)

