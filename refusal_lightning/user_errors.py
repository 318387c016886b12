"""Bad input as one ``error:`` line: the parser class that says so, and the rule that turns our errors into exit 2.

Shared by the command line (``cli``) and the fit entry (``train.fit``), which the pipeline also calls.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

PROG = "python -m refusal_lightning"


class UsageError(ValueError):
    """A bad command line or config value (jsonargparse's message, with a pointer to ``--help``)."""


def brief_errors(parser_class: type) -> type:
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


def exit_on_user_error(run: Callable[..., Any], *args: Any) -> Any:
    """``run(*args)``; an error this package raises for bad input is printed as one ``error:`` line and
    becomes ``SystemExit(2)``. Anything else (a bug, a library's error) propagates with its traceback."""
    try:
        return run(*args)
    except Exception as exc:  # our own error types are user-facing validation errors
        if not type(exc).__module__.startswith("refusal_lightning"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
