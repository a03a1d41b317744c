"""The texts `tformer eval` scores: files given with --data, or the held-out text a run trained
with.

A run's held-out text is its validation split, rebuilt from the corpus files exactly as
pre-tokenising split them (pretokenize.split_offset and split_piece): the last val_fraction of
each file's bytes, from a line boundary (.txt), or the records that start there (.jsonl). The
corpus is found through config.json's "data" (recorded by `tformer train`: absolute paths, sizes,
their hash, the fraction), or, for runs trained before that, through the token cache's meta.json
for the run's tokenizer; either way the files must still hash to what was trained on. A fine-tune
(LoRA or full) is scored on its base's held-out text, so base and fine-tune compare on the same
text; an imported model has none.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tformer_cli.data.corpus import (
    check_corpus_text,
    iter_jsonl_texts,
    iter_text_chunks,
    resolve_corpus,
)
from tformer_cli.data.pretokenize import (
    META_FILE,
    corpus_sha256,
    default_cache_dir,
    split_offset,
    split_piece,
)
from tformer_cli.errors import TformerError
from tformer_cli.evaluation.scoring import CHUNK_BYTES, Document
from tformer_cli.runs.rundir import read_dir_config

BINARY_PROBE = 64 << 10  # bytes looked at for a NUL, which no text file holds


class NoHeldOutText(TformerError):
    """A run whose held-out text cannot be found (or no longer matches what it trained on)."""


@dataclass
class Text:
    """A text to score: its files read whole, or the held-out part of each (val_fraction)."""

    label: str  # how the table names it
    files: list[Path]
    val_fraction: float | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        """What makes two texts the same (runs with the same held-out text share a ranking)."""
        return (tuple(str(p.resolve()) for p in self.files), self.val_fraction)

    @property
    def size(self) -> int:
        """Bytes read to score it (about its UTF-8 bytes): the progress bar's total."""
        sizes = [p.stat().st_size for p in self.files]
        if self.val_fraction is None:
            return sum(sizes)
        return sum(n - split_offset(n, self.val_fraction) for n in sizes)

    def documents(self) -> Iterator[Document]:
        """The text's documents, each as (offset, text) chunks: a .txt file (or its held-out
        part) is one document, each .jsonl record another, as pre-tokenising makes them."""
        for path in self.files:
            if self.val_fraction is None:
                if path.suffix == ".jsonl":
                    yield from ([record] for record in iter_jsonl_texts(path))
                else:
                    yield iter_text_chunks(path, CHUNK_BYTES)
            else:
                yield from _held_out_documents(path, self.val_fraction)


def _held_out_documents(path: Path, val_fraction: float) -> Iterator[Document]:
    split_at = split_offset(path.stat().st_size, val_fraction)
    if path.suffix == ".jsonl":  # a record goes whole to the split it starts in
        yield from ([(o, t)] for o, t in iter_jsonl_texts(path) if o >= split_at)
        return
    yield (
        (offset, piece)
        for offset, text in iter_text_chunks(path, CHUNK_BYTES)
        for split, piece in split_piece(offset, text, split_at)
        if split == "val"
    )


def data_text(path: str | Path) -> Text:
    """A --data file (or a directory of .txt/.jsonl files), checked: it exists, holds text, and
    is UTF-8 throughout (a TformerError naming the file and what is wrong otherwise)."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise TformerError(f"{path}: empty; --data takes a file with text in it")
    files = resolve_corpus([path])
    for file in files:
        with open(file, "rb") as f:
            head = f.read(BINARY_PROBE)
        nul = head.find(b"\0")
        if nul >= 0:
            raise TformerError(
                f"{file}: binary data (a NUL byte at offset {nul}), not text; "
                "--data takes UTF-8 text or .jsonl"
            )
    check_corpus_text(files)  # every byte UTF-8, every .jsonl record with a "text"
    return Text(label=str(path), files=files)


def held_out_text(run_dir: str | Path) -> Text:
    """The text a run held out from training (its base's, for a fine-tune), or NoHeldOutText
    saying why there is none."""
    run_dir, seen = Path(run_dir), []
    info = read_dir_config(run_dir)
    while info is not None and info.get("finetune") and isinstance(info.get("base"), str):
        seen.append(run_dir.resolve())
        run_dir = Path(info["base"])
        if run_dir.resolve() in seen:
            raise NoHeldOutText(f"{seen[0]}: its bases make a cycle")
        info = read_dir_config(run_dir)
    if info is None:
        raise NoHeldOutText(f"{run_dir}: no readable config.json, so no known training text")
    if "imported_from" in info:
        raise NoHeldOutText(f"{run_dir}: an imported model; tformer does not know its text")
    if isinstance(info.get("data"), dict):
        files, fraction = _recorded_corpus(run_dir, info["data"])
    elif "train" in info:
        files, fraction = _cached_corpus(run_dir, info)
    else:
        raise NoHeldOutText(f"{run_dir}: not trained by tformer, so no known training text")
    names = ", ".join(p.name for p in files[:2]) + (", ..." if len(files) > 2 else "")
    return Text(f"held-out {names} (last {fraction:.0%})", files, fraction)


def _recorded_corpus(run_dir: Path, data: dict[str, Any]) -> tuple[list[Path], float]:
    """The corpus config.json's "data" names, checked against its sizes and hash."""
    try:
        files = [Path(f["path"]) for f in data["files"]]
        sizes = [int(f["bytes"]) for f in data["files"]]
        fraction, digest = float(data["val_fraction"]), data["corpus_sha256"]
    except (KeyError, TypeError, ValueError):
        what = 'config.json\'s "data" is not as `train` writes it'
        raise NoHeldOutText(f"{run_dir}: {what}") from None
    for path, size in zip(files, sizes, strict=True):
        if not path.is_file():
            raise NoHeldOutText(f"{run_dir}: its training text {path} is gone")
        if path.stat().st_size != size:
            raise NoHeldOutText(f"{run_dir}: its training text {path} changed since training")
    if corpus_sha256(files) != digest:
        raise NoHeldOutText(f"{run_dir}: its training text changed since training")
    return files, fraction


def _cached_corpus(run_dir: Path, info: dict[str, Any]) -> tuple[list[Path], float]:
    """For runs that predate "data": the corpus of the token cache built with this run's
    tokenizer and validation fraction, when exactly one such corpus is still on disk."""
    train = info.get("train") if isinstance(info.get("train"), dict) else {}
    fraction, tokenizer = train.get("val_fraction", 0.1), info.get("tokenizer_sha256")
    found: dict[str, list[Path]] = {}
    for meta_path in sorted((default_cache_dir() / "tokens").glob(f"*/{META_FILE}")):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            files = [Path(f) for f in meta["files"]]
            match = meta["tokenizer_sha256"] == tokenizer and meta["val_fraction"] == fraction
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if match and files and all(p.is_file() for p in files):
            if corpus_sha256(files) == meta.get("corpus_sha256"):
                found[meta["corpus_sha256"]] = files
    if len(found) != 1:
        why = "several cached corpora match it" if found else "its corpus is not recorded"
        raise NoHeldOutText(f"{run_dir}: {why}")
    return next(iter(found.values())), fraction
