"""The generation engine: prefill in one pass, decode through the KV cache, stream text out.

Prefill runs the prompt through `model.hidden` in one pass (the head only on the last position);
decoding then feeds one token per row through `DecodeStep`, which writes into the preallocated
KV cache. Batches of prompts are left-padded: each row gets its own positions and a key mask,
so a row's output equals what it would be alone.

Past the context window the window slides: when the cache is full, the last half of the window
is prefilled again into the cache from slot 0 and decoding goes on. Positions restart at 0, so
learned and sinusoidal positions stay in range and RoPE models never see a position they were
not trained on; the model always sees at least half a window of context. `use_cache=False`
recomputes the same window from scratch at every step through the plain forward pass, so
greedy output is identical with and without the cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from models import KVCache, Transformer
from models.decode import decode_step_for
from tformer_cli.data.tokenizer import Tokenizer
from tformer_cli.inference.sampling import SamplingConfig, sample

REPLACEMENT = "\ufffd"  # what decoding shows for an unfinished UTF-8 character


class StreamDecoder:
    """Turns one row's tokens into text as they come, giving out only text that is final.

    Each push decodes just the last few tokens (cost independent of the length so far): the
    text of ids[prefix:] minus the text of ids[prefix:read] is what the new tokens add, which
    keeps sentencepiece's word-boundary spaces right. A character split over byte-fallback
    tokens waits until it is whole, and text that might be the start of a stop string is held
    back until it is not.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Iterable[str] = ()):
        self.tok = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.text = ""  # all final text so far (cut before a stop string once one appears)
        self.emitted = 0  # how much of text has been given out
        self.stopped = False
        self._prefix = self._read = 0

    def push(self, token: int) -> str:
        """Add a token; return the text that became final."""
        if self.stopped:
            return ""
        self.ids.append(token)
        window = self.tok.decode(self.ids[self._prefix :])
        if window.endswith(REPLACEMENT):
            return ""  # the last character is not complete yet
        before = (
            self.tok.decode(self.ids[self._prefix : self._read])
            if self._read > self._prefix
            else ""
        )
        scan_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += window[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        end = len(self.text)
        if self.stops:
            hits = [at for s in self.stops if (at := self.text.find(s, scan_from)) != -1]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
                end = len(self.text)
            else:
                end -= self._partial_stop()
        return self._emit(end)

    def finish(self) -> str:
        """Whatever is still held back (an unfinished character shows as U+FFFD)."""
        if not self.stopped and self._read < len(self.ids):
            before = (
                self.tok.decode(self.ids[self._prefix : self._read])
                if self._read > self._prefix
                else ""
            )
            self.text += self.tok.decode(self.ids[self._prefix :])[len(before) :]
            self._prefix = self._read = len(self.ids)
        return self._emit(len(self.text))

    def _partial_stop(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        for n in range(min(self.longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted : end], end
        return out


@dataclass
class Completion:
    """One row's result."""

    prompt_ids: list[int]
    ids: list[int] = field(
        default_factory=list
    )  # generated tokens, without the EOS that ended them
    text: str = ""
    finish: str = "length"  # "eos", "stop" or "length"
    context: list[int] = field(
        default_factory=list
    )  # the tokens now in the KV cache (row 0 of a cache passed in)


@dataclass
class GenerationStats:
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
            self.pos = (torch.arange(self.width, device=device)[None] - pads[:, None]).clamp(
                min=0
            )  # (B, T)
            self.key_mask = (
                torch.arange(capacity, device=device)[None] >= pads[:, None]
            )  # (B, capacity)
            self.last_pos = self.width - 1 - pads  # (B,) each row's position of its newest token

    def advance(self) -> None:
        """One more token per row, in the next cache slot."""
        self.width += 1
        if self.last_pos is not None:
            self.last_pos += 1


def _eos_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """EOS and the chat template's <|end|>: either ends a reply."""
    ids = [tokenizer.eos_id, getattr(tokenizer, "marker_ids", {}).get("<|end|>", -1)]
    return tuple(i for i in ids if i >= 0)


@torch.inference_mode()
def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    max_new_tokens: int,
    stops: Iterable[str] = (),
    use_cache: bool = True,
    seed: int | None = None,
    on_text: Callable[[int, str], None] | None = None,
    cache: KVCache | None = None,
    reuse: int = 0,
    eos_ids: Iterable[int] | None = None,
    fused_step: bool = True,
) -> tuple[list[Completion], GenerationStats]:
    """Continue each prompt (a list of ids, at most the context window long) by up to max_new_tokens.

    on_text(row, text) receives each row's text as it becomes final. A row ends at one of
    eos_ids (default: EOS and <|end|>), after a stop string (not included in the text) or after
    max_new_tokens. A single prompt may bring its own cache whose first `reuse` slots already
    hold the prompt's first tokens (a chat's earlier turns): only the rest is prefilled.
    fused_step=False decodes through model.hidden instead of the fused DecodeStep (for comparison).
    """
    window = model.config.max_seq_len
    keep = max(1, window // 2)
    device = model.tok_emb.weight.device
    rows = [list(p) or [tokenizer.bos_id] for p in prompts]
    if any(len(r) > window for r in rows):
        raise ValueError(f"a prompt is longer than the context window of {window} tokens")
    B = len(rows)
    ends = frozenset(_eos_ids(tokenizer) if eos_ids is None else eos_ids)
    vocab = min(getattr(tokenizer, "vocab_size", model.config.vocab_size), model.config.vocab_size)
    starts = [0] * B
    results = [Completion(prompt_ids=list(r)) for r in rows]
    decoders = [StreamDecoder(tokenizer, stops) for _ in rows]
    done = [False] * B
    stats = GenerationStats(prompt_tokens=sum(len(r) for r in rows))
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            seen[i, [t for t in r if t < vocab]] = True
    if cache is None:
        # Only as many slots as this call can fill: a short reply from a long-context model needs a
        # fraction of the memory, and the window slides only once it is full, so nothing changes.
        need = min(window, max(len(r) for r in rows) + max_new_tokens)
        cache = model.new_cache(B, need) if use_cache else None
        reuse = 0
    elif B != 1 or not 0 <= reuse < len(rows[0]):
        raise ValueError(
            "a cache passed in serves one prompt, and reuse must leave a token to prefill"
        )
    step_fn = decode_step_for(model) if cache is not None and fused_step else None
    capacity = cache.max_len if cache is not None else window

    def prefill(win: _Window, skip: int = 0) -> torch.Tensor:
        """Logits (B, vocab) after the window; with a cache, slots skip.. are (re)written."""
        pos = None if win.pos is None else win.pos[:, skip:]
        h = model.hidden(win.idx[:, skip:], cache=cache, start=skip, pos=pos, key_mask=win.key_mask)
        return model.head(h[:, -1])[:, :vocab]

    def decode(win: _Window, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) after one more token per row, through the cache."""
        slot = win.width - 1
        if step_fn is None:  # a model the fused step does not cover (e.g. LoRA-wrapped)
            pos = None if win.last_pos is None else win.last_pos[:, None]
            h = model.hidden(
                tokens[:, None], cache=cache, start=slot, pos=pos, key_mask=win.key_mask
            )
            return model.head(h[:, -1])[:, :vocab]
        positions = slot if win.last_pos is None else win.last_pos
        return step_fn(tokens, cache, slot, positions, win.key_mask)[:, :vocab]

    t0 = time.perf_counter()
    win = _Window(rows, starts, device, capacity)
    logits = prefill(win, reuse)
    for step in range(max_new_tokens):
        token = sample(logits, sampling, generator, seen)  # (B,)
        ids = token.tolist()
        if step == 0:
            stats.prefill_seconds = time.perf_counter() - t0
        for i, t in enumerate(ids):
            if done[i]:
                continue
            if t in ends:
                done[i], results[i].finish = True, "eos"
                continue
            results[i].ids.append(t)
            stats.new_tokens += 1
            stats.decode_tokens += int(step > 0)
            piece = decoders[i].push(t)
            if piece and on_text:
                on_text(i, piece)
            if decoders[i].stopped:
                done[i], results[i].finish = True, "stop"
        if all(done) or step == max_new_tokens - 1:
            break
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        for r, t in zip(rows, ids, strict=True):
            r.append(t)  # finished rows too: every row's window then fills and slides in step
        if win.width == window:  # the window is full: keep its last half and prefill again
            starts = [max(s, len(r) - keep) for r, s in zip(rows, starts, strict=True)]
            win = _Window(rows, starts, device, capacity)
            stats.slides += 1
            logits = prefill(win)
            continue
        if cache is None:
            win = _Window(rows, starts, device, capacity)
            logits = prefill(win)
        else:
            win.advance()
            logits = decode(win, token)
    stats.decode_seconds = time.perf_counter() - t0 - stats.prefill_seconds
    for i, dec in enumerate(decoders):
        rest = dec.finish()
        if rest and on_text:
            on_text(i, rest)
        results[i].text = dec.text
    filled = win.width if cache is not None else 0
    results[0].context = rows[0][starts[0] : starts[0] + filled - win.pads[0]]
    return results, stats


def sample_text(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str = "",
    max_new_tokens: int = 80,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
) -> str:
    """A short continuation of prompt: what training shows at evals."""
    ids = [tokenizer.bos_id, *tokenizer.encode(prompt)][-model.config.max_seq_len :]
    cfg = SamplingConfig(temperature=temperature, top_k=top_k)
    (completion,), _ = generate(model, tokenizer, [ids], cfg, max_new_tokens, seed=seed)
    return prompt + completion.text
