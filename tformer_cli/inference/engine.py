"""The generation engine: token ids in, one new token id per row and step out.

Prefill runs each prompt through the model in one pass; decoding then feeds one token per row
through the preallocated KV cache. Both ask the model for the logits of the last position
(`Transformer.last_logits`), which takes the model's fused one-token step where it applies.
Batches of prompts are left-padded: each row gets its own positions and a key mask, so a row's
output equals what it would be alone.

Past the context window the window slides: when the cache is full, the last half of the window
is prefilled again into the cache from slot 0 and decoding goes on. Positions restart at 0, so
learned and sinusoidal positions stay in range and RoPE models never see a position they were
not trained on; the model always sees at least half a window of context. `use_cache=False`
recomputes the same window from scratch at every step through the plain forward pass, so
greedy output is identical with and without the cache.

Text (streaming decoded pieces, stop strings) is the caller's: see text.py, whose `generate`,
`sample_text`, `Completion` and `StreamDecoder` are importable from here as well.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from models import KVCache, Transformer
from tformer_cli.inference.sampling import SamplingConfig, sample


@dataclass
class GenerationStats:
    """Token counts and timings of one generate call."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0  # time to first token: prefill + the first sample
    decode_seconds: float = 0.0  # everything after the first token
    decode_tokens: int = 0  # tokens produced after the first step (what decode_seconds bought)
    slides: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "time_to_first_token_s": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "window_slides": self.slides,
        }


class _Window:
    """What the model sees: each row's tokens since the last slide, left-padded into one batch."""

    def __init__(
        self, rows: list[list[int]], starts: list[int], device: torch.device, capacity: int
    ):
        ctx = [r[s:] for r, s in zip(rows, starts, strict=True)]
        self.width = max(len(c) for c in ctx)  # slots in use (the cache's fill level)
        self.pads = [self.width - len(c) for c in ctx]
        self.idx = torch.tensor(
            [[0] * p + c for p, c in zip(self.pads, ctx, strict=True)], device=device
        )
        self.pos = self.key_mask = self.last_pos = None
        if any(self.pads):
            pads = torch.tensor(self.pads, device=device)
            arange = torch.arange(self.width, device=device)
            self.pos = (arange[None] - pads[:, None]).clamp(min=0)  # (B, T)
            self.key_mask = torch.arange(capacity, device=device)[None] >= pads[:, None]  # (B, S)
            self.last_pos = self.width - 1 - pads  # (B,) each row's position of its newest token

    def advance(self) -> None:
        """One more token per row, in the next cache slot."""
        self.width += 1
        if self.last_pos is not None:
            self.last_pos += 1


class TokenEngine:
    """Continues prompts (lists of token ids) by up to max_new_tokens each, one step at a time.

    Iterating yields each step's new token per row, or None for a row that has finished. A row
    finishes at one of `ends` (not yielded; its finish is "eos"), when the caller calls stop(row)
    ("stop"), or after max_new_tokens ("length"). Then ids holds each row's new tokens, stats the
    counts and timings, and context the tokens the cache holds for row 0.

    A single prompt may bring its own cache whose first `reuse` slots already hold the prompt's
    first tokens (a chat's earlier turns): only the rest is prefilled. vocab limits sampling to
    the first vocab ids (a tokenizer may know fewer than the model embeds). fused=False decodes
    through hidden() instead of the model's fused step (for comparison).
    """

    def __init__(
        self,
        model: Transformer,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        max_new_tokens: int,
        ends: Iterable[int] = (),
        *,
        vocab: int | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        cache: KVCache | None = None,
        reuse: int = 0,
        fused: bool = True,
    ):
        self.model, self.sampling, self.max_new_tokens = model, sampling, max_new_tokens
        self.window = model.config.max_seq_len
        self.rows = [list(p) for p in prompts]
        if not all(self.rows):
            raise ValueError("a prompt is empty; start it with BOS at least")
        if any(len(r) > self.window for r in self.rows):
            raise ValueError(f"a prompt is longer than the context window of {self.window} tokens")
        B = len(self.rows)
        self.ends, self.fused = frozenset(ends), fused
        self.vocab = min(vocab or model.config.vocab_size, model.config.vocab_size)
        self.device = model.tok_emb.weight.device
        self.ids: list[list[int]] = [[] for _ in range(B)]
        self.finish = ["length"] * B
        self.done = [False] * B
        self.starts = [0] * B
        self.context: list[int] = []
        self.stats = GenerationStats(prompt_tokens=sum(len(r) for r in self.rows))
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.seen = self._seen() if sampling.repetition_penalty != 1.0 else None
        self.cache, self.reuse = self._cache(cache, reuse, use_cache)

    def _seen(self) -> torch.Tensor:
        """(B, vocab) bool: the tokens of each row so far, which the repetition penalty hits."""
        seen = torch.zeros(len(self.rows), self.vocab, dtype=torch.bool, device=self.device)
        for i, r in enumerate(self.rows):
            seen[i, [t for t in r if t < self.vocab]] = True
        return seen

    def _cache(
        self, cache: KVCache | None, reuse: int, use_cache: bool
    ) -> tuple[KVCache | None, int]:
        if cache is not None:
            if len(self.rows) != 1 or not 0 <= reuse < len(self.rows[0]):
                raise ValueError(
                    "a cache passed in serves one prompt, and reuse must leave a token to prefill"
                )
            return cache, reuse
        if not use_cache:
            return None, 0
        # Only as many slots as this call can fill: a short reply from a long-context model needs
        # a fraction of the memory, and the window slides only once it is full, so nothing changes.
        need = min(self.window, max(len(r) for r in self.rows) + self.max_new_tokens)
        return self.model.new_cache(len(self.rows), need), 0

    def stop(self, row: int) -> None:
        """Finish a row now (its text reached a stop string)."""
        self.done[row], self.finish[row] = True, "stop"

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int | None]]:
        """Prefill, then one step per new token: each row's token, None once it has finished."""
        t0 = time.perf_counter()
        win = self._window()
        logits = self._prefill(win, self.reuse)
        for step in range(self.max_new_tokens):
            token = sample(logits, self.sampling, self.generator, self.seen)  # (B,)
            ids = token.tolist()
            if step == 0:
                self.stats.prefill_seconds = time.perf_counter() - t0
            yield self._take(ids, step)
            if all(self.done) or step == self.max_new_tokens - 1:
                break
            win, logits = self._feed(win, token, ids)
        self.stats.decode_seconds = time.perf_counter() - t0 - self.stats.prefill_seconds
        filled = win.width if self.cache is not None else 0
        start = self.starts[0]
        self.context = self.rows[0][start : start + filled - win.pads[0]]

    def _take(self, ids: list[int], step: int) -> list[int | None]:
        """Each row's new token, None for a finished row; an end token finishes its row."""
        out: list[int | None] = []
        for i, t in enumerate(ids):
            if not self.done[i] and t in self.ends:
                self.done[i], self.finish[i] = True, "eos"
            out.append(None if self.done[i] else t)
            if not self.done[i]:
                self.ids[i].append(t)
        taken = sum(t is not None for t in out)
        self.stats.new_tokens += taken
        self.stats.decode_tokens += taken if step > 0 else 0
        return out

    def _feed(
        self, win: _Window, token: torch.Tensor, ids: list[int]
    ) -> tuple[_Window, torch.Tensor]:
        """Append each row's token (finished rows too: every window then fills and slides in
        step) and return the next window and its logits."""
        if self.seen is not None:
            self.seen.scatter_(1, token[:, None], True)
        for r, t in zip(self.rows, ids, strict=True):
            r.append(t)
        if win.width == self.window:  # the window is full: keep its last half and prefill again
            keep = max(1, self.window // 2)
            self.starts = [
                max(s, len(r) - keep) for r, s in zip(self.rows, self.starts, strict=True)
            ]
            self.stats.slides += 1
        elif self.cache is not None:
            win.advance()
            return win, self._decode(win, token)
        win = self._window()
        return win, self._prefill(win)

    def _window(self) -> _Window:
        capacity = self.cache.max_len if self.cache is not None else self.window
        return _Window(self.rows, self.starts, self.device, capacity)

    def _prefill(self, win: _Window, skip: int = 0) -> torch.Tensor:
        """Logits (B, vocab) after the window; with a cache, slots skip.. are (re)written."""
        pos = None if win.pos is None else win.pos[:, skip:]
        logits = self.model.last_logits(
            win.idx[:, skip:], self.cache, skip, fused=self.fused, pos=pos, key_mask=win.key_mask
        )
        return logits[:, : self.vocab]

    def _decode(self, win: _Window, token: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) after one more token per row, written at the cache's next slot."""
        pos = None if win.last_pos is None else win.last_pos[:, None]  # (B, 1)
        logits = self.model.last_logits(
            token[:, None],
            self.cache,
            win.width - 1,
            fused=self.fused,
            pos=pos,
            key_mask=win.key_mask,
        )
        return logits[:, : self.vocab]
