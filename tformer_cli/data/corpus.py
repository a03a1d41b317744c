"""Reading corpora: text files, directories of them, and JSONL with a "text" field, streamed.

Text must be UTF-8: a file that is not stops with an error naming the file and the byte offset
of the first invalid byte (silently replacing characters would train on garbage).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from tformer_cli.errors import TformerError, decode_utf8, parse_json

CORPUS_SUFFIXES = (".txt", ".jsonl")
CHUNK_BYTES = 1 << 20
LONG_LINE_CHUNKS = 16


def resolve_corpus(paths: list[str | Path], exclude: list[str | Path] = ()) -> list[Path]:
    """The corpus files: files as given, directories expanded to their .txt/.jsonl files (sorted).

    A directory scan skips what tformer itself wrote (run directories, token caches), hidden
    directories and the paths in exclude, so `tformer train .` never trains on its own output.
    """
    skip = {_key(p) for p in (*exclude, _default_cache())}
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            if _tformer_output(path):
                raise TformerError(
                    f"{path}: is a tformer run or token directory, not a corpus; give text files"
                )
            found = sorted(_scan(path, skip))
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


def _key(path: str | Path) -> str:
    """A path's identity for comparisons (resolved, so ./runs/x and runs/x are the same)."""
    return os.path.normcase(os.path.realpath(path))


def _default_cache() -> Path:
    from tformer_cli.data.pretokenize import default_cache_dir  # pretokenize builds on this module

    return default_cache_dir()


def _scan(root: Path, skip: set[str]) -> Iterator[Path]:
    """The .txt/.jsonl files under root, not descending into skipped directories."""
    for directory, subdirs, names in os.walk(root):
        here = Path(directory)
        subdirs[:] = [d for d in subdirs if not _skipped(here / d, skip)]
        for name in names:
            path = here / name
            if path.suffix in CORPUS_SUFFIXES and path.is_file():
                yield path


def _skipped(directory: Path, skip: set[str]) -> bool:
    """Whether a scan leaves this directory out: hidden, excluded, or tformer's own output."""
    if directory.name.startswith(".") or _key(directory) in skip:
        return True
    if _tformer_output(directory):
        return True
    # A folder of runs (./runs) or of token caches (cache/tokens): what tformer writes, in bulk.
    return directory.name in ("runs", "tokens") and any(
        _tformer_output(child) for child in _subdirs(directory)
    )


def _subdirs(directory: Path) -> list[Path]:
    try:
        return [p for p in directory.iterdir() if p.is_dir()]
    except OSError:
        return []


def _tformer_output(directory: Path) -> bool:
    """A run directory (finished or not) or a pre-tokenised corpus, by what tformer writes there."""
    from tformer_cli.data.pretokenize import META_FILE  # pretokenize builds on this module

    return is_run_output(directory) or _token_meta(directory / META_FILE)


def is_run_output(directory: Path) -> bool:
    """A run directory, finished or not, by what tformer writes there (`tformer runs` lists
    these; a corpus scan leaves them out)."""
    # runs.rundir builds on this module: imported when first needed
    from tformer_cli.runs.lock import LOCK_FILE
    from tformer_cli.runs.rundir import METRICS_FILE, TOKENIZER_FILE, TRAIN_STATE_DIR, is_run_dir

    if (
        is_run_dir(directory)
        or (directory / LOCK_FILE).exists()
        or (directory / TRAIN_STATE_DIR).is_dir()
    ):
        return True
    # a start that has not saved its first checkpoint (config.json) yet
    return (directory / METRICS_FILE).is_file() and (directory / TOKENIZER_FILE).is_file()


def _token_meta(path: Path) -> bool:
    """Whether path is the meta.json of `tformer tokenize corpus` or of the token cache."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format_version" in data and "tokenizer_sha256" in data


def _decode(data: bytes, path: Path, offset: int) -> str:
    return decode_utf8(data, path, offset, "; convert it to UTF-8 first")


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
            record = parse_json(line, path, lineno)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise TformerError(
                    f'{path}:{lineno}: expected an object with a "text" string field'
                )
            yield start, record["text"]


def iter_documents(path: Path) -> Iterator[tuple[int, str]]:
    """(byte offset, text) pieces of one corpus file: line-aligned chunks of a .txt, records of a
    .jsonl."""
    return iter_jsonl_texts(path) if path.suffix == ".jsonl" else iter_text_chunks(path)


def check_corpus_text(files: list[Path]) -> None:
    """Read the corpus once, as training will: raise naming the file and the place of the first
    bad byte or record.

    Checking before a run starts means a bad corpus stops the command before it creates,
    replaces or deletes anything.
    """
    for path in files:
        for _ in iter_documents(path):
            pass
