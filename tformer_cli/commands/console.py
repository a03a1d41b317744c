"""The terminal side that the inference commands share: which model, stdin, text that is not UTF-8.

Not a command: helpers for generate and chat (commands never import each other).
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from tformer_cli.errors import TformerError
from tformer_cli.runs.locate import find_model


def pick_model(model_dir: Path | None, err: Console) -> Path:
    """The directory --model names; without it the newest run under ./runs, said on stderr."""
    path, chosen = find_model(model_dir)
    if chosen:
        err.print(
            f"using {path} (the most recently trained run; choose another with -m)",
            markup=False,
            highlight=False,
        )
    return path


def utf8_problem(text: str) -> str | None:
    """Why text cannot be written as UTF-8 (bytes that were not UTF-8 arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        byte = 0xDC80 <= ch <= 0xDCFF  # how surrogateescape carries a byte that is not UTF-8
        what = f"byte 0x{ch - 0xDC00:02x}" if byte else f"lone surrogate U+{ch:04X}"
        return f"{what} at character {e.start + 1}"
    return None


def check_text(text: str, what: str) -> str:
    """text, or a TformerError saying that what (e.g. "--prompt") is not valid UTF-8 text."""
    problem = utf8_problem(text)
    if problem:
        raise TformerError(f"{what} is not valid UTF-8 text ({problem}); give UTF-8 text")
    return text


def require_stdin(why: str) -> None:
    """A TformerError when the process has no stdin at all (started with it closed: `<&-`)."""
    stdin = sys.stdin
    try:
        usable = stdin is not None and not stdin.closed
    except (AttributeError, ValueError):
        usable = False
    if not usable:
        raise TformerError(f"stdin is closed; {why}")
