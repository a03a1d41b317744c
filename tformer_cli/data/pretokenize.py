"""Pre-tokenising a corpus into token files for training, streamed and cached.

Layout of a token directory: train.bin and val.bin (flat numpy arrays, uint16 when the vocab
fits, else uint32; read back with np.memmap) and meta.json (counts, hashes), written last.
Each corpus file is one document, each .jsonl record too; a document is BOS, its tokens, EOS. The
last val_fraction of every file's bytes (from a line or record boundary) is validation data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import BinaryIO

import numpy as np

from models.weights import atomic_write_text
from tformer_cli.data.corpus import iter_documents, resolve_corpus
from tformer_cli.data.tokenizer import Tokenizer
from tformer_cli.errors import TformerError

FORMAT_VERSION = 2
META_FILE = "meta.json"
SPLITS = ("train", "val")
FLUSH_CHARS = 4 << 20  # text encoded per batch: a few chunks, so both cores get work
Progress = Callable[[int, int], None]


@dataclass
class TokenData:
    """A pre-tokenised corpus on disk."""

    directory: str
    dtype: str
    train_tokens: int
    val_tokens: int
    train_bytes: int
    val_bytes: int
    tokenizer_sha256: str
    corpus_sha256: str

    def path(self, split: str) -> Path:
        """The token file of "train" or "val"."""
        return Path(self.directory) / f"{split}.bin"

    @property
    def train_path(self) -> Path:
        """train.bin."""
        return self.path("train")

    @property
    def val_path(self) -> Path:
        """val.bin."""
        return self.path("val")

    @property
    def meta_path(self) -> Path:
        """meta.json: counts and hashes, written last (a directory without it is unfinished)."""
        return Path(self.directory) / META_FILE

    def load(self, split: str) -> np.ndarray:
        """The tokens of "train" or "val", memory-mapped."""
        n = self.train_tokens if split == "train" else self.val_tokens
        if n == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path(split), dtype=self.dtype, mode="r", shape=(n,))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def corpus_sha256(files: list[Path]) -> str:
    """One hash over the corpus files' names and contents."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def pretokenize(
    paths: list[str | Path],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    progress: Progress | None = None,
    num_threads: int | None = None,
    corpus_hash: str | None = None,
) -> TokenData:
    """Tokenise the corpus into out_dir/{train,val}.bin + meta.json, a few MB at a time.

    progress is called with (bytes done, total bytes). The token files are written under
    temporary names unique to this process and renamed at the end, meta.json last, so a
    finished directory is one with a meta.json that matches its token files, and two processes
    tokenising one corpus into one directory at once both succeed (same bytes; the last rename
    wins).
    """
    if not 0 <= val_fraction < 1:
        raise TformerError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = resolve_corpus(paths)
    out = Path(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp, sinks = _open_token_files(out)
    pending = _Pending(tokenizer, sinks, dtype, num_threads)
    try:
        _tokenize_files(files, pending, val_fraction, progress)
    except BaseException:  # failed or interrupted: leave nothing half-written behind
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    finally:
        for f in sinks.values():
            f.close()
    for split in SPLITS:
        os.replace(tmp[split], out / f"{split}.bin")
    data = TokenData(
        directory=str(out),
        dtype=dtype.name,
        train_tokens=pending.tokens["train"],
        val_tokens=pending.tokens["val"],
        train_bytes=pending.bytes["train"],
        val_bytes=pending.bytes["val"],
        tokenizer_sha256=tokenizer.sha256,
        corpus_sha256=corpus_hash or corpus_sha256(files),
    )
    meta = {
        "format_version": FORMAT_VERSION,
        **asdict(data),
        "files": [str(p) for p in files],
        "val_fraction": val_fraction,
    }
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return data


def _open_token_files(out: Path) -> tuple[dict[str, Path], dict[str, BinaryIO]]:
    """Temporary token files in out, one a split, opened for writing: (paths, files)."""
    tmp: dict[str, Path] = {}
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / META_FILE).unlink(missing_ok=True)  # a stale meta.json must not vouch for new files
        for split in SPLITS:
            fd, name = tempfile.mkstemp(prefix=f".{split}.bin.", suffix=".tmp", dir=out)
            os.close(fd)
            tmp[split] = Path(name)
        return tmp, {split: open(tmp[split], "wb") for split in SPLITS}
    except OSError as e:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise TformerError(f"{out}: cannot write token files there ({e.strerror})") from None


def _tokenize_files(
    files: list[Path], pending: _Pending, val_fraction: float, progress: Progress | None
) -> None:
    """Every file's documents into pending, each split of a file framed by BOS ... EOS."""
    bos, eos = pending.tokenizer.bos_id, pending.tokenizer.eos_id
    total = sum(p.stat().st_size for p in files)
    done = 0
    for path in files:
        size = path.stat().st_size
        split_at = split_offset(size, val_fraction)
        started: set[str] = set()
        for offset, text in iter_documents(path):
            if path.suffix == ".jsonl":  # a record is a document: it goes whole to one split
                pending.add("val" if offset >= split_at else "train", bos, text, eos)
            else:  # the file is one document per split it reaches: BOS ... EOS in each
                for split, piece in split_piece(offset, text, split_at):
                    if split not in started:
                        started.add(split)
                        pending.add(split, bos)
                    pending.add(split, piece)
            if pending.chars >= FLUSH_CHARS:
                pending.flush()
            if progress:
                progress(done + offset, total)
        for split in SPLITS:
            if split in started:
                pending.add(split, eos)
        pending.flush()
        done += size
        if progress:
            progress(done, total)


def split_offset(size: int, val_fraction: float) -> int:
    """Where a file of size bytes turns to validation data (before moving to a line or record
    boundary): its last val_fraction is held out."""
    return int(size * (1 - val_fraction))


def split_piece(offset: int, text: str, split_at: int) -> list[tuple[str, str]]:
    """A text chunk at a byte offset, divided at the train/val boundary (on a line break).

    `tformer eval` rebuilds a run's held-out text with this, exactly as it was split here.
    """
    raw = text.encode("utf-8")
    if offset + len(raw) <= split_at:
        return [("train", text)]
    if offset >= split_at:
        return [("val", text)]
    cut = raw.rfind(b"\n", 0, split_at - offset) + 1
    head, tail = raw[:cut].decode("utf-8"), raw[cut:].decode("utf-8")
    return [(s, t) for s, t in (("train", head), ("val", tail)) if t]


class _Pending:
    """Texts and special ids waiting to be encoded in one batch and appended to their split."""

    def __init__(self, tokenizer: Tokenizer, sinks, dtype: np.dtype, num_threads: int | None):
        self.tokenizer, self.sinks, self.dtype, self.num_threads = (
            tokenizer,
            sinks,
            dtype,
            num_threads,
        )
        self.items: list[tuple[str, str | int]] = []
        self.chars = 0
        self.tokens = dict.fromkeys(SPLITS, 0)
        self.bytes = dict.fromkeys(SPLITS, 0)

    def add(self, split: str, *items: str | int) -> None:
        """Queue texts (to encode) and token ids (as they are) for split, in order."""
        for item in items:
            self.items.append((split, item))
            if isinstance(item, str):
                self.chars += len(item)

    def flush(self) -> None:
        """Encode what is queued and append the ids to the split files."""
        texts = [t for _, t in self.items if isinstance(t, str)]
        # One batch on all threads: sentencepiece encodes the texts of a list in parallel.
        encoded = iter(self.tokenizer.encode_batch(texts, self.num_threads) if texts else [])
        runs: dict[str, list] = {split: [] for split in SPLITS}
        for split, item in self.items:
            if isinstance(item, str):
                runs[split].append(next(encoded))
                self.bytes[split] += len(item.encode("utf-8"))
            else:
                runs[split].append([item])
        for split, run in runs.items():
            ids = np.fromiter(chain.from_iterable(run), dtype=self.dtype)
            ids.tofile(self.sinks[split])
            self.tokens[split] += len(ids)
        self.items.clear()
        self.chars = 0


def default_cache_dir() -> Path:
    """$TFORMER_CACHE, else $XDG_CACHE_HOME/tformer, else ~/.cache/tformer."""
    if os.environ.get("TFORMER_CACHE"):
        return Path(os.environ["TFORMER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tformer"


class TokenDataError(TformerError):
    """A token directory whose files do not match its meta.json or its tokenizer."""


def read_token_data(directory: Path) -> TokenData | None:
    """The TokenData of a finished token directory, or None (no meta.json, or an older format).

    A meta.json that cannot be read as one raises TokenDataError.
    """
    meta = directory / META_FILE
    if not meta.is_file():
        return None
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise TokenDataError(f"{meta}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise TokenDataError(f"{meta}: not a JSON object")
    if data.get("format_version") != FORMAT_VERSION:
        return None
    try:
        return TokenData(**{k: data[k] for k in TokenData.__dataclass_fields__})
    except KeyError as e:
        raise TokenDataError(f"{meta}: no {e} field") from None


def check_token_data(data: TokenData, vocab_size: int) -> None:
    """Raise TokenDataError unless the token files have the sizes meta.json gives and every id
    is below vocab_size.

    The range check reads each file once (memory-mapped); it catches a cache built with another
    tokenizer or damaged in place, which would otherwise fail mid-training with a bare IndexError.
    """
    try:
        dtype = np.dtype(data.dtype)
        counts = {"train": int(data.train_tokens), "val": int(data.val_tokens)}
    except (TypeError, ValueError) as e:
        raise TokenDataError(f"{data.meta_path}: bad dtype or token count ({e})") from None
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)) or min(counts.values()) < 0:
        raise TokenDataError(f"{data.meta_path}: bad dtype {data.dtype} or a negative token count")
    for split, n in counts.items():
        path = data.path(split)
        size = path.stat().st_size if path.is_file() else -1
        if size != n * dtype.itemsize:
            raise TokenDataError(
                f"{path}: {size} bytes, but meta.json says {n} tokens of {dtype.itemsize} bytes"
            )
        if n and int(data.load(split).max()) >= vocab_size:
            raise TokenDataError(f"{path}: holds token ids beyond the tokenizer's {vocab_size}")


def pretokenize_cached(
    paths: list[str | Path],
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    val_fraction: float = 0.1,
    progress: Progress | None = None,
    notice: Callable[[str], None] | None = None,
) -> tuple[TokenData, bool]:
    """pretokenize() into cache_dir/<key>/ unless done before; returns (data, cache hit).

    A cached directory that fails its checks (meta.json, sizes, id range) is rebuilt, and
    notice (if given) is told why and where.
    """
    files = resolve_corpus(paths)
    corpus_hash = corpus_sha256(files)
    key = hashlib.sha256(
        f"{FORMAT_VERSION}:{corpus_hash}:{tokenizer.sha256}:{val_fraction}".encode()
    ).hexdigest()[:24]
    directory = Path(cache_dir) / "tokens" / key
    try:
        cached = read_token_data(directory)
        if cached is not None:
            check_token_data(cached, tokenizer.vocab_size)
            return cached, True
    except TokenDataError as e:
        if notice:
            notice(f"token cache damaged, rebuilding it: {e}")
    return pretokenize(
        files, tokenizer, directory, val_fraction, progress, corpus_hash=corpus_hash
    ), False
