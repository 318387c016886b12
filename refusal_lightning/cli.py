"""Command line: ``fit/validate/test/predict`` through LightningCLI, the other commands through jsonargparse.

Typed signatures and docstrings are the schema: ``--help`` and ``--print_config`` come from them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

USAGE = """usage: python -m refusal_lightning COMMAND [options]

Training (LightningCLI; `COMMAND --help` for every option, `--print_config` for the resolved YAML):
  fit        train a LoRA: `fit --config configs/refusal_lora.yaml [--ckpt_path last]`
  validate   validation loss of a checkpoint          test / predict  likewise
Other commands (`COMMAND --help`):
  tiny-model write the offline tiny Qwen3 model used by the demo and tests
  directions adapter dir -> refusal parameter-space directions file
  serve      OpenAI-compatible server for a base model and its adapters
  evaluate   SORRY-Bench-style evaluation over OpenAI-compatible endpoints
  push       upload adapter dirs (with model cards) to the Hugging Face Hub
  pipeline   refusal fit -> directions -> two attacks -> serve -> evaluate, from one config
"""


def _lightning_cli(args: list[str]) -> None:
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

    from refusal_lightning.data import HarmfulQADataModule
    from refusal_lightning.model import RefusalLoRAModule

    class RunFolderConfig(SaveConfigCallback):
        """Also writes the resolved config beside the adapter, so the run folder reproduces the run."""

        def save_config(self, trainer, pl_module, stage: str) -> None:
            folder = Path(getattr(pl_module, "output_dir", "."))
            folder.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(folder / "config.yaml"), skip_none=False, overwrite=True)

    class RefusalCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")

    RefusalCLI(
        RefusalLoRAModule,
        HarmfulQADataModule,
        save_config_callback=RunFolderConfig,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=None if args == sys.argv[1:] else args,  # LightningCLI warns when given both
    )


COMMAND_TARGETS = {
    "tiny-model": "refusal_lightning.tiny:tiny_model",
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


def _list_params(command: Callable) -> set[str]:
    import inspect
    import typing

    hints = typing.get_type_hints(command)
    return {name for name in inspect.signature(command).parameters
            if list in (typing.get_origin(hints.get(name)), *map(typing.get_origin, typing.get_args(hints.get(name))))}


def repeatable(args: list[str], list_params: set[str]) -> list[str]:
    """``--adapter a=x --adapter b=y`` -> jsonargparse's append form ``--adapter+ a=x --adapter+ b=y``.

    A value that is already a list (``--adapter '[a=x, b=y]'``) is left alone.
    """
    out = []
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        key = name[2:] if name.startswith("--") else None
        if key in list_params:
            nxt = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            if not nxt.lstrip().startswith("["):
                arg = f"--{key}+{eq}{value}"
        out.append(arg)
    return out


def _run(args: list[str]) -> None:
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    if args[0] in LIGHTNING_COMMANDS:
        _lightning_cli(args)
        return
    if args[0] not in COMMAND_TARGETS:
        raise SystemExit(f"error: unknown command '{args[0]}'\n\n{USAGE}")
    from jsonargparse import CLI

    command = _command(args[0])
    CLI(command, args=repeatable(args[1:], _list_params(command)), prog=f"python -m refusal_lightning {args[0]}",
        as_positional=False)


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
