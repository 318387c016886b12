"""The fit's progress bar: optimizer steps out of ``max_steps``, with tqdm's rate and ETA.

Lightning's bar counts batches per epoch, which says little when a run is sized by ``max_steps``
(every shipped config): the epoch number has no end, and the total is not the run's. The CLI puts
this bar in place of Lightning's unless the config brings its own or turns the bar off.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """With ``trainer.max_steps`` set, one training bar for the whole run: ``step / max_steps``, rate and
    ETA (from this session's steps, so a resumed run's ETA is not skewed), the epoch in the description.
    Without ``max_steps`` it is Lightning's per-epoch bar."""

    def _by_steps(self, trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._by_steps(trainer):
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.n = bar.initial = trainer.global_step  # a resumed run starts where it stopped
            bar.unit = "step"

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._by_steps(trainer):
            super().on_train_epoch_start(trainer, *args)
            return
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._by_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        step = trainer.global_step
        if self.is_enabled and (step % self.refresh_rate == 0 or step >= trainer.max_steps):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._by_steps(trainer):
            super().on_train_epoch_end(trainer, pl_module)
        elif not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
