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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.weights import atomic_write_text
from tformer_cli.corpus import iter_documents, resolve_corpus
from tformer_cli.tokenizer import Tokenizer

FORMAT_VERSION = 2
META_FILE = "meta.json"
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
        return Path(self.directory) / f"{split}.bin"

    def load(self, split: str) -> np.ndarray:
        """The tokens of "train" or "val", memory-mapped."""
        n = self.train_tokens if split == "train" else self.val_tokens
        if n == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path(split), dtype=self.dtype, mode="r", shape=(n,))


def token_dtype(vocab_size: int) -> np.dtype:
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
    """Tokenise the corpus into out_dir/{train,val}.bin + meta.json, a few MB at a time."""
    files = resolve_corpus(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    total = sum(p.stat().st_size for p in files)
    counts = {"train": 0, "val": 0}
    nbytes = {"train": 0, "val": 0}
    tmp = {split: out / f".{split}.bin.tmp" for split in counts}
    sinks = {split: open(tmp[split], "wb") for split in counts}
    done = 0
    try:
        for path in files:
            size = path.stat().st_size
            split_at = int(size * (1 - val_fraction))
            batch: list[tuple[str, str | int]] = []
            seen = set()
            for offset, text in iter_documents(path):
                if path.suffix == ".jsonl":  # a record is a document: it goes whole to one split
                    split = "val" if offset >= split_at else "train"
                    batch += [(split, tokenizer.bos_id), (split, text), (split, tokenizer.eos_id)]
                else:
                    for split, piece in _split_piece(offset, text, split_at):
                        if split not in seen:
                            batch.append((split, tokenizer.bos_id))
                            seen.add(split)
                        batch.append((split, piece))
                if sum(len(t) for _, t in batch if isinstance(t, str)) >= 4 << 20:
                    _flush(batch, tokenizer, sinks, counts, nbytes, dtype, num_threads)
                if progress:
                    progress(done + offset, total)
            batch += [(split, tokenizer.eos_id) for split in ("train", "val") if split in seen]
            _flush(batch, tokenizer, sinks, counts, nbytes, dtype, num_threads)
            done += size
            if progress:
                progress(done, total)
    finally:
        for f in sinks.values():
            f.close()
    for split in counts:
        os.replace(tmp[split], out / f"{split}.bin")
    data = TokenData(
        directory=str(out), dtype=dtype.name, train_tokens=counts["train"], val_tokens=counts["val"],
        train_bytes=nbytes["train"], val_bytes=nbytes["val"], tokenizer_sha256=tokenizer.sha256,
        corpus_sha256=corpus_hash or corpus_sha256(files),
    )
    meta = {"format_version": FORMAT_VERSION, **asdict(data), "files": [str(p) for p in files],
            "val_fraction": val_fraction}
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return data


def _split_piece(offset: int, text: str, split_at: int) -> list[tuple[str, str]]:
    """A text chunk at a byte offset, divided at the train/val boundary (on a line break)."""
    raw = text.encode("utf-8")
    if offset + len(raw) <= split_at:
        return [("train", text)]
    if offset >= split_at:
        return [("val", text)]
    cut = raw.rfind(b"\n", 0, split_at - offset) + 1
    head, tail = raw[:cut].decode("utf-8"), raw[cut:].decode("utf-8")
    return [(s, t) for s, t in (("train", head), ("val", tail)) if t]


def _flush(batch, tokenizer, sinks, counts, nbytes, dtype, num_threads) -> None:
    """Encode the pending (split, text or token id) pieces and append them to their split."""
    texts = [t for _, t in batch if isinstance(t, str)]
    encoded = iter(tokenizer.encode_batch(texts, num_threads) if texts else [])
    for split, item in batch:
        if isinstance(item, str):
            ids = next(encoded)
            nbytes[split] += len(item.encode("utf-8"))
        else:
            ids = [item]
        np.asarray(ids, dtype=dtype).tofile(sinks[split])
        counts[split] += len(ids)
    batch.clear()


def default_cache_dir() -> Path:
    """$TFORMER_CACHE, else $XDG_CACHE_HOME/tformer, else ~/.cache/tformer."""
    if os.environ.get("TFORMER_CACHE"):
        return Path(os.environ["TFORMER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tformer"


def read_token_data(directory: Path) -> TokenData | None:
    """The TokenData of a finished token directory, or None."""
    meta = directory / META_FILE
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        return None
    fields = TokenData.__dataclass_fields__
    return TokenData(**{k: v for k, v in data.items() if k in fields})


def pretokenize_cached(
    paths: list[str | Path],
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    val_fraction: float = 0.1,
    progress: Progress | None = None,
) -> tuple[TokenData, bool]:
    """pretokenize() into cache_dir/<key>/ unless done before; returns (data, cache hit)."""
    files = resolve_corpus(paths)
    corpus_hash = corpus_sha256(files)
    key = hashlib.sha256(
        f"{FORMAT_VERSION}:{corpus_hash}:{tokenizer.sha256}:{val_fraction}".encode()
    ).hexdigest()[:24]
    directory = Path(cache_dir) / "tokens" / key
    cached = read_token_data(directory)
    if cached is not None:
        return cached, True
    return pretokenize(files, tokenizer, directory, val_fraction, progress, corpus_hash=corpus_hash), False
