"""sentencepiece tokenizers: training them for a corpus, loading and applying them.

Every tokenizer tformer trains round-trips any UTF-8 text exactly (identity normalisation,
whitespace kept, byte fallback for unseen characters, newline as a token of its own), splits
digits, has unk/bos/eos/pad ids 0-3, and reserves the chat markers as single tokens.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from models.weights import atomic_write
from tformer_cli.corpus import iter_lines, resolve_corpus
from tformer_cli.errors import TformerError

CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
MODEL_TYPES = ("bpe", "unigram", "char")
HELD_OUT_EVERY = 20  # every 20th line is kept out of training to measure chars per token


class Tokenizer:
    """A loaded sentencepiece model with tformer's conventions."""

    def __init__(self, path: Path, processor: spm.SentencePieceProcessor, sha256: str):
        self.path, self.sp, self.sha256 = path, processor, sha256
        self.vocab_size = processor.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = processor.bos_id(), processor.eos_id(), processor.pad_id()
        self.marker_ids = {m: i for m in CHAT_MARKERS if (i := processor.piece_to_id(m)) != processor.unk_id()}

    @property
    def has_chat_markers(self) -> bool:
        return len(self.marker_ids) == len(CHAT_MARKERS)

    def encode(self, text: str) -> list[int]:
        """Token ids of text (no BOS/EOS added; chat markers become their single tokens)."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """encode() for many texts at once, on several threads."""
        return self.sp.encode(texts, num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TformerError(f"token id {bad[0]} is out of range: this tokenizer has ids 0..{self.vocab_size - 1}")
        return self.sp.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a sentencepiece .model file, with a clear error when it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise TformerError(f"{path}: tokenizer not found; train one with `tformer tokenize train`")
    data = path.read_bytes()
    processor = spm.SentencePieceProcessor()
    try:
        processor.load_from_serialized_proto(data)
    except (RuntimeError, OSError, TypeError):
        processor = None
    if processor is None or processor.get_piece_size() == 0:
        raise TformerError(f"{path}: not a sentencepiece model (corrupt or another format)")
    return Tokenizer(path, processor, hashlib.sha256(data).hexdigest())


@dataclass
class TokenizerSummary:
    """What `tokenize train` reports."""

    path: Path
    vocab_size: int
    model_type: str
    chars_per_token: float
    seconds: float
    sha256: str


def train_tokenizer(
    paths: list[str | Path],
    output: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
    progress: Callable[[str], None] | None = None,
) -> TokenizerSummary:
    """Train a sentencepiece model on the corpus and write it to output atomically.

    character_coverage below 1 leaves the rarest characters to byte fallback, so they still
    round-trip but do not crowd the vocabulary. At most max_sentences lines are sampled.
    """
    if model_type not in MODEL_TYPES:
        raise TformerError(f"--type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    if not 0 < character_coverage <= 1:
        raise TformerError(f"--character-coverage must be in (0, 1], got {character_coverage}")
    files = resolve_corpus(paths)
    held_out: list[str] = []

    def lines():
        for i, line in enumerate(iter_lines(files)):
            if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 and sum(map(len, held_out)) < 200_000:
                held_out.append(line)
            elif line:
                yield line

    start = time.perf_counter()
    if progress:
        progress("training")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, byte_fallback=True, split_digits=True,
            remove_extra_whitespaces=False, add_dummy_prefix=False, normalization_rule_name="identity",
            allow_whitespace_only_pieces=True, user_defined_symbols=[*CHAT_MARKERS, "\n"],
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, max_sentence_length=1 << 16, minloglevel=2, num_threads=os.cpu_count() or 1,
        )
    except RuntimeError as e:
        raise TformerError(_explain_training_error(str(e), vocab_size)) from None
    if not model.getvalue():
        raise TformerError("corpus is empty: there is no text to train a tokenizer on")
    data = model.getvalue()
    atomic_write(output, lambda tmp: Path(tmp).write_bytes(data))
    tok = load_tokenizer(output)
    sample = "\n".join(held_out)
    n_tokens = len(tok.encode(sample))
    return TokenizerSummary(
        path=Path(output), vocab_size=tok.vocab_size, model_type=model_type,
        chars_per_token=len(sample) / n_tokens if n_tokens else 0.0,
        seconds=time.perf_counter() - start, sha256=tok.sha256,
    )


def _explain_training_error(message: str, vocab_size: int) -> str:
    too_high = re.search(r"Vocabulary size (?:is )?too high.*?<= (\d+)", message)
    if too_high:
        return (f"--vocab-size {vocab_size} is larger than this corpus supports; "
                f"the largest that works is {too_high.group(1)}")
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return (f"--vocab-size {vocab_size} is too small: this corpus needs at least {too_low.group(2)} "
                "(256 byte-fallback pieces, the special tokens and its common characters)")
    if "no sentences" in message.lower() or "empty" in message.lower():
        return "corpus is empty: there is no text to train a tokenizer on"
    return f"sentencepiece could not train: {message.splitlines()[-1] if message else 'unknown error'}"
