"""sentencepiece tokenizers: training them for a corpus, loading and applying them.

Every tokenizer tformer trains round-trips any UTF-8 text exactly (identity normalisation,
whitespace kept, byte fallback for unseen characters, newline as a token of its own), splits
digits, has unk/bos/eos/pad ids 0-3, and reserves the chat markers as single tokens (ids 4-7).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from models.weights import atomic_write
from tformer_cli.data.corpus import iter_documents, resolve_corpus
from tformer_cli.errors import TformerError

CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
MODEL_TYPES = ("bpe", "unigram", "char")
HELD_OUT_EVERY = 20  # every 20th line is kept out of training to measure chars per token
HELD_OUT_CHARS = 200_000  # enough held-out text for a stable chars-per-token figure
MAX_LINE_CHARS = 16_384  # longer lines are cut for training: sentencepiece skips long sentences
# sentencepiece writes a space as U+2581 inside pieces and decodes every U+2581 back to a space,
# so a literal U+2581 in the text is encoded as its UTF-8 bytes (byte-fallback pieces) instead.
SPACE_SYMBOL = "\u2581"
# What makes a tformer tokenizer (see above): text round-trips exactly (identity normalisation,
# whitespace kept, byte fallback), digits split, fixed special ids, the chat markers and the
# newline single tokens; sentencepiece's own logging off.
TRAINER_OPTIONS = {
    "byte_fallback": True,
    "split_digits": True,
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "normalization_rule_name": "identity",
    "allow_whitespace_only_pieces": True,
    "user_defined_symbols": [*CHAT_MARKERS, "\n"],
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": 3,
    "max_sentence_length": 4 * MAX_LINE_CHARS,
    "minloglevel": 2,
}


class Tokenizer:
    """A loaded sentencepiece model with tformer's conventions."""

    def __init__(self, path: Path, processor: spm.SentencePieceProcessor, sha256: str):
        self.path, self.sp, self.sha256 = path, processor, sha256
        self.vocab_size = processor.get_piece_size()
        self.bos_id, self.eos_id, self.pad_id = (
            processor.bos_id(),
            processor.eos_id(),
            processor.pad_id(),
        )
        self.marker_ids = {
            m: i for m in CHAT_MARKERS if (i := processor.piece_to_id(m)) != processor.unk_id()
        }
        byte_ids = [processor.piece_to_id(f"<0x{b:02X}>") for b in SPACE_SYMBOL.encode()]
        # A foreign model without byte fallback cannot keep a literal U+2581:
        # leave it to sentencepiece.
        self._space_symbol_ids = byte_ids if all(processor.is_byte(i) for i in byte_ids) else None

    @property
    def has_chat_markers(self) -> bool:
        """Whether all four chat markers are single tokens of this tokenizer."""
        return len(self.marker_ids) == len(CHAT_MARKERS)

    @property
    def adds_space_prefix(self) -> bool:
        """Whether sentencepiece puts a space before the text (tformer's tokenizers never do)."""
        return self.sp.encode("a", out_type=str)[0].startswith(SPACE_SYMBOL)

    def encode(self, text: str) -> list[int]:
        """Token ids of text (no BOS/EOS added; chat markers become their single tokens)."""
        return self.encode_batch([text], num_threads=1)[0]

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """encode() for many texts at once, on several threads (all cores by default)."""
        threads = num_threads or os.cpu_count() or 1
        if self._space_symbol_ids is None or not any(SPACE_SYMBOL in t for t in texts):
            return self.sp.encode(list(texts), num_threads=threads)
        parts = [t.split(SPACE_SYMBOL) for t in texts]
        encoded = iter(self.sp.encode([p for ps in parts for p in ps], num_threads=threads))
        out = []
        for ps in parts:
            ids = list(next(encoded))
            for _ in ps[1:]:
                ids += self._space_symbol_ids
                ids += next(encoded)
            out.append(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        """The text of token ids; BOS/EOS/pad decode to nothing. Out-of-range ids are an error."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TformerError(
                f"token id {bad[0]} is out of range: "
                f"this tokenizer has ids 0..{self.vocab_size - 1}"
            )
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        """The piece of id i as sentencepiece stores it (a space shows as U+2581)."""
        return self.sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece; the unk id (0) when the piece is not in the vocabulary."""
        return self.sp.piece_to_id(piece)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a sentencepiece .model file (or a run directory's tokenizer.model), with a clear
    error."""
    from tformer_cli.runs.rundir import TOKENIZER_FILE  # rundir builds on this module

    path = Path(path)
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise TformerError(
                f"{path}: a directory without {TOKENIZER_FILE}; give the tokenizer's .model file"
            )
        path = path / TOKENIZER_FILE
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
    progress: Callable[[int, int], None] | None = None,
) -> TokenizerSummary:
    """Train a sentencepiece model on the corpus and write it to output atomically.

    character_coverage below 1 (sentencepiece's 0.9995 by default) leaves the rarest characters
    to byte fallback: they still round-trip exactly but do not crowd the vocabulary. At most
    max_sentences lines, a uniform sample, are trained on, so memory stays bounded. progress is
    called with (bytes read, total bytes) while the corpus is read; training follows it.
    """
    if model_type not in MODEL_TYPES:
        raise TformerError(f"--type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    if not 0 < character_coverage <= 1:
        raise TformerError(f"--character-coverage must be in (0, 1], got {character_coverage}")
    if max_sentences < 1:
        raise TformerError(f"--max-sentences must be at least 1, got {max_sentences}")
    start = time.perf_counter()
    sample, held_out = _sample_lines(resolve_corpus(paths), max_sentences, progress)

    def drain():  # hands the lines over one by one, so they are not held twice
        while sample:
            yield sample.pop()

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=drain(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            num_threads=os.cpu_count() or 1,
            **TRAINER_OPTIONS,
        )
    except RuntimeError as e:
        raise TformerError(_explain_training_error(str(e), vocab_size)) from None
    data = model.getvalue()
    if not data:
        raise TformerError("corpus is empty: there is no text to train a tokenizer on")
    atomic_write(output, lambda tmp: Path(tmp).write_bytes(data))
    tok = load_tokenizer(output)
    text = "\n".join(held_out)
    n_tokens = len(tok.encode(text))
    return TokenizerSummary(
        path=Path(output),
        vocab_size=tok.vocab_size,
        model_type=model_type,
        chars_per_token=len(text) / n_tokens if n_tokens else 0.0,
        seconds=time.perf_counter() - start,
        sha256=tok.sha256,
    )


def _sample_lines(
    files: list[Path], max_sentences: int, progress: Callable[[int, int], None] | None
) -> tuple[list[str], list[str]]:
    """(training lines, held-out lines): every HELD_OUT_EVERY-th line is held out (up to
    HELD_OUT_CHARS), the rest are reservoir-sampled down to max_sentences.

    The sample is seeded, unlike sentencepiece's own input_sentence_size sampling, so the same
    corpus always gives the same tokenizer (and `tformer train` finds its cached tokens again).
    Lines longer than MAX_LINE_CHARS are cut, which sentencepiece would otherwise skip.
    """
    rng = random.Random(0)
    sample: list[str] = []
    held_out: list[str] = []
    total = sum(p.stat().st_size for p in files)
    n, seen, kept, done = 0, 0, 0, 0
    for path in files:
        for offset, text in iter_documents(path):
            for line in text.splitlines():
                n += 1
                if n % HELD_OUT_EVERY == 0 and kept < HELD_OUT_CHARS:
                    held_out.append(line)
                    kept += len(line)
                    continue
                for i in range(0, len(line), MAX_LINE_CHARS):
                    seen += 1
                    if len(sample) < max_sentences:
                        sample.append(line[i : i + MAX_LINE_CHARS])
                    elif (j := rng.randrange(seen)) < max_sentences:
                        sample[j] = line[i : i + MAX_LINE_CHARS]
            if progress:
                progress(done + offset, total)
        done += path.stat().st_size
        if progress:
            progress(done, total)
    return sample, held_out


def _explain_training_error(message: str, vocab_size: int) -> str:
    too_high = re.search(r"Vocabulary size (?:is )?too high.*?<= (\d+)", message)
    if too_high:
        return (
            f"--vocab-size {vocab_size} is larger than this corpus supports; "
            f"the largest that works is {too_high.group(1)}"
        )
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return (
            f"--vocab-size {vocab_size} is too small: "
            f"this corpus needs at least {too_low.group(2)} "
            "(256 byte-fallback pieces, the special tokens and its common characters)"
        )
    if "no sentences" in message.lower() or "empty" in message.lower():
        return "corpus is empty: there is no text to train a tokenizer on"
    return (
        f"sentencepiece could not train: {message.splitlines()[-1] if message else 'unknown error'}"
    )
