"""The generation engine: prefill in one pass, decode through the KV cache, stream text out.

Past the context window the window slides: when the cache is full, the last half of the
window is prefilled again into a fresh cache and decoding goes on (positions restart at 0, so
learned and sinusoidal positions stay in range). `use_cache=False` recomputes the same window
from scratch at every step, so greedy output is identical with and without the cache.

Batches of prompts are left-padded; each row gets its own positions and a key mask, so a row's
output equals what it would be alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models import KVCache, Transformer
from tformer_cli.sampling import SamplingConfig, sample
from tformer_cli.tokenizer import Tokenizer


class StreamDecoder:
    """Turns one row's tokens into text as they come, printing only what is final.

    Pieces are decoded together (a character split over byte-fallback tokens appears whole)
    and text that might be the start of a stop string is held back until it is not.
    """

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...] = ()):
        self.tok, self.stops = tokenizer, tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the newly final text."""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        for stop in self.stops:
            at = text.find(stop)
            if at != -1:
                text, self.stopped = text[:at], True
        self.text = text
        end = len(text)
        if not self.stopped:
            while end > self.emitted and text[end - 1] == "\ufffd":  # an unfinished UTF-8 character
                end -= 1
            end = min(end, len(text) - self._partial_stop(text))
        return self._emit(end)

    def finish(self) -> str:
        """Whatever is still held back."""
        return self._emit(len(self.text))

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of text that begins some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-n:]):
                    best = n
                    break
        return best

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted : end], end
        return out


@dataclass
class Completion:
    """One row's result."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)  # generated tokens, without the EOS that ended them
    text: str = ""
    finish: str = "length"  # "eos", "stop" or "length"
    context: list[int] = field(default_factory=list)  # the tokens now in the KV cache (row 0 of a cache passed in)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0  # time to first token
    decode_seconds: float = 0.0
    slides: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "time_to_first_token_s": self.prefill_seconds, "decode_seconds": self.decode_seconds,
            "decode_tokens_per_s": self.decode_tokens_per_s, "window_slides": self.slides,
        }


class _Window:
    """What the model sees: each row's tokens since the last slide, left-padded into one batch."""

    def __init__(self, rows: list[list[int]], starts: list[int], device: torch.device, capacity: int):
        ctx = [r[s:] for r, s in zip(rows, starts, strict=True)]
        width = max(len(c) for c in ctx)
        self.pads = [width - len(c) for c in ctx]
        self.idx = torch.tensor([[0] * p + c for p, c in zip(self.pads, ctx, strict=True)], device=device)
        if any(self.pads):
            pads = torch.tensor(self.pads, device=device)[:, None]
            self.pos = (torch.arange(width, device=device)[None] - pads).clamp(min=0)  # (B, T)
            self.key_mask = torch.arange(capacity, device=device)[None] >= pads  # (B, capacity)
        else:
            self.pos = self.key_mask = None

    @property
    def filled(self) -> int:
        return self.idx.size(1)

    def append(self, tokens: torch.Tensor) -> None:
        """Add one token per row (B,)."""
        self.idx = torch.cat([self.idx, tokens[:, None]], dim=1)
        if self.pos is not None:
            self.pos = torch.cat([self.pos, self.pos[:, -1:] + 1], dim=1)


@torch.inference_mode()
def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    max_new_tokens: int,
    stops: tuple[str, ...] = (),
    use_cache: bool = True,
    seed: int | None = None,
    on_text: Callable[[int, str], None] | None = None,
    cache: KVCache | None = None,
    reuse: int = 0,
) -> tuple[list[Completion], GenerationStats]:
    """Continue each prompt (a list of ids, at most the context window long) by up to max_new_tokens.

    on_text(row, text) receives each row's text as it becomes final. A single prompt may bring
    its own cache whose first `reuse` slots already hold the prompt's first tokens (a chat's
    earlier turns): only the rest is prefilled.
    """
    window = model.config.max_seq_len
    keep = max(1, window // 2)
    device = model.tok_emb.weight.device
    rows = [list(p) or [tokenizer.bos_id] for p in prompts]
    if any(len(r) > window for r in rows):
        raise ValueError(f"a prompt is longer than the context window of {window} tokens")
    B = len(rows)
    starts = [0] * B
    results = [Completion(prompt_ids=list(r)) for r in rows]
    decoders = [StreamDecoder(tokenizer, stops) for _ in rows]
    done = [False] * B
    stats = GenerationStats(prompt_tokens=sum(len(r) for r in rows))
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool)
        for i, r in enumerate(rows):
            seen[i, r] = True
    if cache is None:
        cache = model.new_cache(B, window) if use_cache else None
        reuse = 0
    elif B != 1 or not 0 <= reuse < len(rows[0]):
        raise ValueError("a cache passed in serves one prompt, and reuse must leave a token to prefill")

    def forward_window(win: _Window, skip: int = 0) -> torch.Tensor:
        h = model.hidden(win.idx[:, skip:], cache=cache, start=skip, pos=win.pos, key_mask=win.key_mask)
        return model.head(h[:, -1]).float()

    t0 = time.perf_counter()
    win = _Window(rows, starts, device, window)
    logits = forward_window(win, reuse).cpu()
    for step in range(max_new_tokens):
        token = sample(logits, sampling, generator, seen)  # (B,)
        if step == 0:
            stats.prefill_seconds = time.perf_counter() - t0
        for i, t in enumerate(token.tolist()):
            if done[i]:
                continue
            if t == tokenizer.eos_id or t == tokenizer.marker_ids.get("<|end|>"):
                done[i], results[i].finish = True, "eos"
                continue
            results[i].ids.append(t)
            rows[i].append(t)
            stats.new_tokens += 1
            piece = decoders[i].push(t)
            if piece and on_text:
                on_text(i, piece)
            if decoders[i].stopped:
                done[i], results[i].finish = True, "stop"
        if all(done) or step == max_new_tokens - 1:
            break
        if seen is not None:
            seen[torch.arange(B), token] = True
        if win.filled == window:  # the window is full: keep its last half and prefill again
            starts = [max(s, len(r) - keep) for r, s in zip(rows, starts, strict=True)]
            win = _Window(rows, starts, device, window)
            stats.slides += 1
            logits = forward_window(win).cpu()
            continue
        win.append(token.to(device))
        if cache is None:
            logits = forward_window(win).cpu()
        else:
            mask = win.key_mask
            pos = None if win.pos is None else win.pos[:, -1:]
            h = model.hidden(win.idx[:, -1:], cache=cache, start=win.filled - 1, pos=pos, key_mask=mask)
            logits = model.head(h[:, -1]).float().cpu()
    stats.decode_seconds = time.perf_counter() - t0 - stats.prefill_seconds
    for i, dec in enumerate(decoders):
        rest = dec.finish()
        if rest and on_text:
            on_text(i, rest)
        results[i].text = dec.text
    results[0].context = win.idx[0, win.pads[0] :].tolist()
    return results, stats


def sample_text(
    model: Transformer, tokenizer: Tokenizer, prompt: str = "", max_new_tokens: int = 80,
    temperature: float = 0.8, top_k: int = 40, seed: int = 0,
) -> str:
    """A short continuation of prompt: what training shows at evals."""
    ids = [tokenizer.bos_id, *tokenizer.encode(prompt)][-model.config.max_seq_len :]
    cfg = SamplingConfig(temperature=temperature, top_k=top_k)
    (completion,), _ = generate(model, tokenizer, [ids], cfg, max_new_tokens, seed=seed)
    return prompt + completion.text
