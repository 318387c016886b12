"""``fit``/``validate``/``test``/``predict`` through LightningCLI: the one way a fit starts.

The command line (``python -m refusal_lightning fit ...``) and the pipeline's fit stages both call
:func:`lightning_cli`, so a stage's fit is exactly the command a user would type.
"""

from __future__ import annotations

import sys
from pathlib import Path

from refusal_lightning.user_errors import PROG, brief_errors

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(args: list[str]) -> None:
    """Run ``args`` (``["fit", "--config", ...]``) through our LightningCLI: the module, the datamodule, the
    run-folder config, the input checks before anything loads, and our progress bar."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

    from refusal_lightning.train.datamodule import HarmfulQADataModule, check_use_distributed_sampler
    from refusal_lightning.train.inputs import check_fit_inputs
    from refusal_lightning.train.module import RefusalLoRAModule
    from refusal_lightning.train.progress import StepProgressBar

    class RunFolderConfig(SaveConfigCallback):
        """Also writes the resolved config beside the adapter, so the run folder reproduces the run."""

        def save_config(self, trainer, pl_module, stage: str) -> None:
            folder = Path(getattr(pl_module, "output_dir", "."))
            folder.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(folder / "config.yaml"), skip_none=False, overwrite=True)

    class RefusalCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")

        def before_instantiate_classes(self) -> None:
            """Refuse what cannot work before anything loads or any process starts."""
            config = self.config[self.subcommand]
            check_use_distributed_sampler(config.trainer.use_distributed_sampler)
            model = config.model
            projection = model.projection
            directions_path = (projection.get("directions_path") if hasattr(projection, "get")
                               else getattr(projection, "directions_path", None))
            check_fit_inputs(model.model_name_or_path, model.merge_adapters, directions_path,
                             [str(c) for c in config.get("config") or []])

        def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
            # Our bar (step / max_steps, ETA) unless the config brings a bar or turns it off.
            given = [*(config.get("callbacks") or []), *callbacks]
            if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
                callbacks = [*callbacks, StepProgressBar()]
            return super()._instantiate_trainer(config, callbacks)

    RefusalCLI(
        RefusalLoRAModule,
        HarmfulQADataModule,
        save_config_callback=RunFolderConfig,
        save_config_kwargs={"overwrite": True},
        parser_class=brief_errors(LightningArgumentParser),
        parser_kwargs={"prog": PROG},
        # The length-grouped sampler shards batches by rank itself; Lightning must not wrap it.
        trainer_defaults={"use_distributed_sampler": False},
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=None if args == sys.argv[1:] else args,  # LightningCLI warns when given both
    )
