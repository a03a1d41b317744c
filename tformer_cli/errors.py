"""The one error type commands raise for bad input; the app turns it into one line on stderr.

Bad bytes and bad JSON in a user's file are reported the same way everywhere: decode_utf8 and
parse_json raise a TformerError naming the file and the place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class TformerError(Exception):
    """A user-facing error: its message says what is wrong, where, and what to do."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def decode_utf8(data: bytes, where: str | Path, offset: int = 0, advice: str = "") -> str:
    """data as text, or a TformerError naming where, the first invalid byte and its place.

    offset: where data starts in its file, so the place given is the byte's offset in the file.
    advice: what to do, appended to the message ("; convert it to UTF-8 first").
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        place = f"byte 0x{data[e.start]:02x} at offset {offset + e.start}"
        raise TformerError(f"{where}: not UTF-8 text ({place}){advice}") from None


def parse_json(text: str, where: str | Path, line: int | None = None) -> Any:
    """json.loads(text), or a TformerError naming where, the line and what is wrong.

    line: the line of where that text is (one line of a JSONL file); else the error's own.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = line if line is not None else e.lineno
        raise TformerError(f"{where}:{at}: invalid JSON ({e.msg}, column {e.colno})") from None
