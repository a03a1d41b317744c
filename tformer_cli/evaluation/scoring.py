"""Scoring a text with a model: the summed next-token loss over the whole text, streamed.

Which tokens are scored, and with how much context (what `tformer eval` reports):

- The text becomes one stream of tokens, as training's token files hold it: each document (a
  file, or a .jsonl record) is BOS, its tokens, EOS, and documents follow one another.
- Windows of `window + 1` tokens start every `stride` tokens (at 0, stride, 2 x stride, ...),
  and the last one ends at the stream's last token. A window predicts its last `window` tokens,
  each from the tokens before it in the window.
- Every token but the first is counted exactly once, in the first window that predicts it: the
  first window counts all its `window` predictions, each later one only the tokens no earlier
  window reached (its last `stride`, fewer in the final window). So after the first window each
  token is predicted from at least `window - stride + 1` tokens of context: more than half a
  window with the default stride of half the window.
- With stride == window the windows do not overlap, and each position counts as training's eval
  counts it (context 0 to window - 1 tokens, evenly): the figure to compare with the run card.

Memory: the text is read in CHUNK_BYTES line-aligned chunks and encoded chunk by chunk; a rolling
buffer holds at most a window, a stride and one chunk's tokens, and a batch holds batch_size
windows, so the peak is the model plus one batch of windows, whatever the text's size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from tformer_cli.data.tokenizer import Tokenizer
from tformer_cli.errors import TformerError
from tformer_cli.training.loss import IGNORE, lm_loss

CHUNK_BYTES = 64 << 10  # text encoded at a time: a few thousand tokens
LOGITS_BUDGET = 64 << 20  # bytes of logits (with their fp32 copy and softmax) per default batch
MAX_DEFAULT_BATCH = 16
Document = Iterable[tuple[int, str]]  # (byte offset in its file, text) chunks of one document
Progress = Callable[[int], None]  # called with the bytes of text read so far


class TextTooShort(TformerError):
    """The text holds fewer tokens than one window needs."""

    def __init__(self, tokens: int, window: int):
        super().__init__(f"{tokens} tokens, but one window needs {window + 1}")
        self.tokens, self.needed = tokens, window + 1


class CannotEncode(TformerError):
    """The tokenizer turns part of the text into its unknown token."""

    def __init__(self, char: str, offset: int):
        super().__init__(
            f"its tokenizer cannot encode {char!r} (U+{ord(char):04X}, in the chunk at byte "
            f"{offset}): the character would become <unk>"
        )
        self.char, self.offset = char, offset


@dataclass
class Score:
    """The loss of a model over one text, summed over the counted tokens."""

    tokens: int = 0  # tokens of the text, BOS and EOS included
    predicted: int = 0  # tokens counted: every token but the first
    bytes: int = 0  # UTF-8 bytes of the text scored
    nats: float = 0.0  # the summed next-token loss of the counted tokens
    seconds: float = 0.0
    window: int = 0
    stride: int = 0

    @property
    def nats_per_token(self) -> float:
        """The mean next-token loss."""
        return self.nats / self.predicted if self.predicted else math.nan

    @property
    def perplexity(self) -> float:
        """exp(nats per token)."""
        return math.exp(self.nats_per_token)

    @property
    def bits_per_byte(self) -> float:
        """The summed loss in bits over the text's UTF-8 bytes: comparable across tokenizers."""
        return self.nats / math.log(2) / self.bytes if self.bytes else math.nan

    @property
    def tokens_per_s(self) -> float:
        """Counted tokens per second of scoring (reading and tokenising included)."""
        return self.predicted / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict[str, float | int]:
        """The figures as JSON values."""
        derived = ("nats_per_token", "perplexity", "bits_per_byte", "tokens_per_s")
        return {**asdict(self), **{k: getattr(self, k) for k in derived}}


class Windows:
    """The windows over a token stream fed piece by piece (see the module docstring).

    feed() yields each window as soon as its tokens are in: (window + 1 token ids, how many of
    its last predictions count); finish() yields the last one, ending at the stream's end.
    """

    def __init__(self, window: int, stride: int):
        if not 1 <= stride <= window:
            raise ValueError(f"stride {stride} must be between 1 and the window {window}")
        self.window, self.stride = window, stride
        self.buffer = np.zeros(0, dtype=np.int64)
        self.base = 0  # the stream position of buffer[0]
        self.start = 0  # where the next window starts
        self.counted = 0  # predictions of the tokens up to here are counted (token 0 never is)

    @property
    def total(self) -> int:
        """Tokens fed so far."""
        return self.base + len(self.buffer)

    def feed(self, ids: list[int] | np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
        """Add tokens; yield the windows they complete."""
        self.buffer = np.concatenate([self.buffer, np.asarray(ids, dtype=np.int64)])
        while self.start + self.window < self.total:
            yield self._take(self.start)
            self.start += self.stride
        # keep what the next window needs, and the last window + 1 tokens for the final one
        keep = min(self.start, self.total - self.window - 1)
        if keep > self.base:
            self.buffer = self.buffer[keep - self.base :]
            self.base = keep

    def finish(self) -> Iterator[tuple[np.ndarray, int]]:
        """The final window, ending at the last token, when tokens are left uncounted."""
        if self.total > self.window and self.counted < self.total - 1:
            yield self._take(self.total - 1 - self.window)

    def _take(self, start: int) -> tuple[np.ndarray, int]:
        end = start + self.window  # the window's last token: its last prediction
        rows = self.buffer[start - self.base : end + 1 - self.base].copy()
        new, self.counted = end - self.counted, end
        return rows, new


def default_batch_size(window: int, vocab_size: int) -> int:
    """Windows per forward pass: as many as keep the logits within LOGITS_BUDGET (1 to 16)."""
    per_window = window * vocab_size * 4 * 3  # fp32 logits, their fp32 copy, log-softmax
    return max(1, min(MAX_DEFAULT_BATCH, LOGITS_BUDGET // per_window))


def warm_up(model: torch.nn.Module, window: int, device: torch.device) -> None:
    """One forward pass of a window, so one-time costs (kernel selection, allocator growth) are
    not counted in the first text's tokens per second."""
    with torch.inference_mode():
        model(torch.zeros(1, window, dtype=torch.long, device=device))


def score_documents(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    documents: Iterable[Document],
    window: int,
    stride: int,
    batch_size: int,
    device: torch.device,
    progress: Progress | None = None,
) -> Score:
    """The model's summed loss over the documents, in windows of window tokens every stride.

    Raises TextTooShort when the text holds fewer than window + 1 tokens, and CannotEncode when
    the tokenizer turns a character into its unknown token.
    """
    windows = Windows(window, stride)
    score = Score(window=window, stride=stride)
    batch: list[tuple[np.ndarray, int]] = []
    started = time.perf_counter()
    model.eval()
    with torch.inference_mode():
        for ids in token_pieces(tokenizer, documents, score, progress):
            for row in windows.feed(ids):
                batch.append(row)
                if len(batch) == batch_size:
                    score.nats += batch_nats(model, batch, device)
                    batch.clear()
        if windows.total <= window:
            raise TextTooShort(windows.total, window)
        batch.extend(windows.finish())
        if batch:
            score.nats += batch_nats(model, batch, device)
    score.tokens, score.predicted = windows.total, windows.total - 1
    score.seconds = time.perf_counter() - started
    return score


def token_pieces(
    tokenizer: Tokenizer, documents: Iterable[Document], score: Score, progress: Progress | None
) -> Iterator[list[int]]:
    """The token stream of the documents, a chunk at a time: BOS, each chunk's tokens, EOS per
    document, as pre-tokenising frames them. Counts the bytes into score."""
    unk, read = tokenizer.sp.unk_id(), 0
    for document in documents:
        started = False
        for offset, text in document:
            ids = tokenizer.encode(text)
            if unk in ids:
                raise CannotEncode(_unencodable(tokenizer, text, unk), offset)
            if not started and tokenizer.bos_id >= 0:
                yield [tokenizer.bos_id]
            started = True
            size = len(text.encode("utf-8"))
            score.bytes += size
            read += size
            yield ids
            if progress:
                progress(read)
        if started and tokenizer.eos_id >= 0:
            yield [tokenizer.eos_id]


def _unencodable(tokenizer: Tokenizer, text: str, unk: int) -> str:
    """The first character of text that the tokenizer encodes as the unknown token."""
    for char in dict.fromkeys(text):
        if unk in tokenizer.encode(char):
            return char
    return text[0]  # only a combination is unknown: name where the chunk starts


def batch_nats(
    model: torch.nn.Module, rows: list[tuple[np.ndarray, int]], device: torch.device
) -> float:
    """The summed loss of a batch of windows, over the predictions each window counts.

    Predictions that do not count get the IGNORE target, so this is training's lm_loss (its mean
    times the number of counted targets).
    """
    data = torch.from_numpy(np.stack([ids for ids, _ in rows])).to(device)
    x, y = data[:, :-1], data[:, 1:]
    new = torch.tensor([n for _, n in rows], device=device)
    skipped = torch.arange(y.size(1), device=device)[None, :] < (y.size(1) - new)[:, None]
    y = y.masked_fill(skipped, IGNORE)
    return lm_loss(model, x, y).item() * int(new.sum())
