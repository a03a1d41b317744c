"""Text on top of the token engine: each row's tokens decoded as they come, stop strings, results.

`generate` is what the commands call: prompts of token ids in, a Completion per row (its tokens
and text, and why it ended) and the engine's GenerationStats out, with each row's text streamed
through on_text as it becomes final.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from models import KVCache, Transformer
from tformer_cli.data.tokenizer import Tokenizer
from tformer_cli.inference.engine import GenerationStats, TokenEngine
from tformer_cli.inference.sampling import SamplingConfig

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
        scan_from = max(0, len(self.text) - self.longest_stop + 1)
        self.text += window[len(self._decoded_before()) :]
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
            before = self._decoded_before()
            self.text += self.tok.decode(self.ids[self._prefix :])[len(before) :]
            self._prefix = self._read = len(self.ids)
        return self._emit(len(self.text))

    def _decoded_before(self) -> str:
        """The text of ids[prefix:read]: what the decoded window starts with that is not new."""
        if self._read <= self._prefix:
            return ""
        return self.tok.decode(self.ids[self._prefix : self._read])

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
    # the generated tokens, without the EOS that ended them
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: str = "length"  # "eos", "stop" or "length"
    # the tokens now in the KV cache (row 0 of a cache passed in)
    context: list[int] = field(default_factory=list)


def end_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The tokens that end generation by default: EOS and the chat template's <|end|>."""
    ids = [tokenizer.eos_id, getattr(tokenizer, "marker_ids", {}).get("<|end|>", -1)]
    return tuple(i for i in ids if i >= 0)


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
    fused: bool = True,
) -> tuple[list[Completion], GenerationStats]:
    """Continue each prompt (a list of ids, at most the context window long) by up to
    max_new_tokens.

    on_text(row, text) receives each row's text as it becomes final. A row ends at one of
    eos_ids (default: EOS and <|end|>), after a stop string (not included in the text) or after
    max_new_tokens. A single prompt may bring its own cache whose first `reuse` slots already
    hold the prompt's first tokens (a chat's earlier turns): only the rest is prefilled.
    fused=False decodes through model.hidden instead of the model's fused step (for comparison).
    """
    rows = [list(p) or [tokenizer.bos_id] for p in prompts]
    engine = TokenEngine(
        model,
        rows,
        sampling,
        max_new_tokens,
        end_ids(tokenizer) if eos_ids is None else eos_ids,
        vocab=getattr(tokenizer, "vocab_size", None),
        seed=seed,
        use_cache=use_cache,
        cache=cache,
        reuse=reuse,
        fused=fused,
    )
    decoders = [StreamDecoder(tokenizer, stops) for _ in rows]
    say = on_text or (lambda row, text: None)
    for step in engine:
        for i, token in enumerate(step):
            if token is None:
                continue
            if piece := decoders[i].push(token):
                say(i, piece)
            if decoders[i].stopped:
                engine.stop(i)
    results = []
    for i, dec in enumerate(decoders):
        if rest := dec.finish():
            say(i, rest)
        results.append(Completion(rows[i], engine.ids[i], dec.text, engine.finish[i]))
    results[0].context = engine.context
    return results, engine.stats


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
