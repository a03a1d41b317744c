"""How `--help` reads: natural placeholders, examples at the end, the quickstart on an empty call.

Recent Typer prints Python types as placeholders (`--version <bool>`, `corpus <list[Path]>`).
The command classes here give every parameter a placeholder a person would write instead:
nothing for flags, `INTEGER`, `FLOAT`, `TEXT`, `PATH` for the rest, or the metavar a command
chose (`RUN_DIR`, `FILE`). Every command's epilog lists a few real command lines (examples()),
and a group called with no arguments prints its help, quickstart included, and exits 0.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, get_args, get_origin

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

QUICKSTART = (
    "tformer train corpus.txt",
    "tformer chat --model runs/corpus",
    "tformer profile --seq-len 2048",
    "tformer tokenize",
)
# Parameters and contexts are typed Any: Typer >= 0.2x brings its own copy of click, older Typer
# uses click itself, and this module serves both.
_TYPE_NAMES = {
    int: "INTEGER",
    float: "FLOAT",
    str: "TEXT",
    Path: "PATH",
    datetime.datetime: "DATETIME",
}


def examples(lines: tuple[str, ...] | list[str], title: str = "Examples") -> str:
    """An epilog listing command lines, one per line (escaped: `[` is not rich markup here)."""
    return f"{title}:\n" + "\n".join(f"  {escape(line)}" for line in lines)


def epilog_commands(epilog: str | None) -> list[str]:
    """The command lines an epilog lists (what examples() put there)."""
    return [
        line.strip().replace("\\[", "[")
        for line in (epilog or "").splitlines()
        if line.strip().startswith("tformer ") or line.strip() == "tformer"
    ]


def _annotation(param: Any) -> Any:
    """The Python type behind a parameter (Typer >= 0.2x), or None on older Typer."""
    descriptor = getattr(param, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None)
    if get_origin(annotation) in (list, tuple):
        args = get_args(annotation)
        annotation = args[0] if args else str
    return annotation


def placeholder(param: Any) -> str:
    """What a person would write for this parameter's value: TEXT, INTEGER, PATH, ..."""
    annotation = _annotation(param)
    if annotation in _TYPE_NAMES:
        return _TYPE_NAMES[annotation]
    click_type = getattr(param, "type", None)
    name = getattr(click_type, "name", None)
    if isinstance(name, str) and name:
        return name.upper()
    return "TEXT"


def naturalize(param: Any) -> None:
    """Give param a natural placeholder (once); flags get none."""
    if getattr(param, "_tformer_natural", False):
        return
    param._tformer_natural = True  # type: ignore[attr-defined]
    if getattr(param, "param_type_name", "") == "argument":
        _naturalize_argument(param)
        return
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        param.metavar = ""
    elif param.metavar is None:
        param.metavar = placeholder(param)


def _naturalize_argument(param: Any) -> None:
    """CORPUS... in the usage line and the name column; no type column (the name says it)."""
    name = param.metavar or (param.name or "value").upper()
    if param.nargs != 1 and not name.endswith("..."):
        name += "..."
    param.metavar = name
    if hasattr(param, "display_type_rich"):  # Typer >= 0.2x shows a type column beside the name
        param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
    if hasattr(param, "_usage_display_name"):  # ... and wraps required names in braces
        usage = name if param.required else f"[{name}]"
        param._usage_display_name = lambda: usage  # type: ignore[method-assign]


class TformerCommand(TyperCommand):
    """A Typer command whose help shows natural placeholders."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            naturalize(param)
        return params


class TformerGroup(TyperGroup):
    """A Typer group with natural placeholders, whose bare call prints its help and exits 0."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            naturalize(param)
        return params

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # Called with nothing, a group shows where to start; that is an answer, not a usage error.
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            text = ctx.get_help()  # rich help prints itself and returns ""
            if text:
                typer.echo(text, color=ctx.color)
            ctx.exit(0)
        return super().parse_args(ctx, args)
