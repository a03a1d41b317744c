"""Reading corpora: text files, directories of them, and JSONL with a "text" field, streamed.

Text must be UTF-8: a file that is not stops with an error naming the file and the byte offset
of the first invalid byte (silently replacing characters would train on garbage).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tformer_cli.errors import TformerError

CORPUS_SUFFIXES = (".txt", ".jsonl")
CHUNK_BYTES = 1 << 20
LONG_LINE_CHUNKS = 16


def resolve_corpus(paths: list[str | Path]) -> list[Path]:
    """The corpus files: files as given, directories expanded to their .txt/.jsonl files (sorted)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES)
            if not found:
                raise TformerError(f"{path}: directory holds no .txt or .jsonl files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise TformerError(f"{path}: no such file or directory")
    if not files:
        raise TformerError("no corpus given: name one or more text files")
    if all(p.stat().st_size == 0 for p in files):
        names = ", ".join(str(p) for p in files[:3])
        raise TformerError(f"{names}: corpus is empty; give a file with text in it")
    return files


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start]
        raise TformerError(
            f"{path}: not UTF-8 text (byte 0x{bad:02x} at offset {offset + e.start}); convert it to UTF-8 first"
        ) from None


def iter_text_chunks(path: Path, chunk_bytes: int | None = None) -> Iterator[tuple[int, str]]:
    """(byte offset, text) chunks of a .txt file of about chunk_bytes, each ending at a line break.

    A line longer than LONG_LINE_CHUNKS chunks is cut at a character boundary instead, so memory
    stays bounded even for a file without line breaks.
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    offset, rest = 0, b""
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            data = rest + block
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                if len(data) < LONG_LINE_CHUNKS * chunk_bytes:
                    rest = data  # a long line: keep reading
                    continue
                cut = _char_boundary(data)
            yield offset, _decode(data[:cut], path, offset)
            offset += cut
            rest = data[cut:]
    if rest:
        yield offset, _decode(rest, path, offset)


def _char_boundary(data: bytes) -> int:
    """The last position in data that does not split a UTF-8 character (0 if none)."""
    cut = len(data)
    while cut > max(0, len(data) - 4) and data[cut - 1] & 0xC0 == 0x80:  # continuation bytes
        cut -= 1
    if cut and data[cut - 1] >= 0xC0:  # a lead byte whose character is incomplete
        cut -= 1
    return cut or len(data)


def iter_jsonl_texts(path: Path) -> Iterator[tuple[int, str]]:
    """(byte offset, text) for each record of a .jsonl file, from its "text" field."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            line = _decode(raw, path, start).strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TformerError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise TformerError(f'{path}:{lineno}: expected an object with a "text" string field')
            yield start, record["text"]


def iter_documents(path: Path) -> Iterator[tuple[int, str]]:
    """(byte offset, text) pieces of one corpus file: line-aligned chunks of a .txt, records of a .jsonl."""
    return iter_jsonl_texts(path) if path.suffix == ".jsonl" else iter_text_chunks(path)

