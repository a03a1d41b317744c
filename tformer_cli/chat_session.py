"""A conversation with a model: turns, the KV cache kept across turns, the context limit.

Each reply prefills only what the cache does not hold yet (the longest common prefix of the
cached tokens and the new prompt is reused). When the conversation no longer fits the context
window with room for a reply, the oldest turns are dropped; the system prompt stays.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models import Transformer
from tformer_cli.chat_template import PLAIN_STOPS, encode_chat, plain_transcript
from tformer_cli.errors import TformerError
from tformer_cli.generation import GenerationStats, generate
from tformer_cli.sampling import SamplingConfig
from tformer_cli.tokenizer import Tokenizer


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TurnStats:
    reply_tokens: int
    prefilled_tokens: int
    reused_tokens: int
    generation: GenerationStats


class ChatSession:
    """Conversation state for `tformer chat`; mode is "chat" (markers) or "plain" (transcript)."""

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, mode: str, sampling: SamplingConfig,
        max_new_tokens: int = 256, system: str | None = None, seed: int | None = None,
    ):
        self.model, self.tok, self.mode = model, tokenizer, mode
        self.sampling, self.max_new_tokens, self.seed = sampling, max_new_tokens, seed
        self.system = system
        self.messages: list[dict[str, str]] = []  # user and assistant turns
        self.cache = model.new_cache(batch_size=1)
        self.cached: list[int] = []
        self.dropped_turns = 0
        self.last: TurnStats | None = None
        self._turn = 0

    # -- the conversation ------------------------------------------------------------------------

    def conversation(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def prompt_ids(self) -> list[int]:
        if self.mode == "chat":
            return encode_chat(self.tok, self.conversation())
        return [self.tok.bos_id, *self.tok.encode(plain_transcript(self.conversation()))]

    def _fit(self) -> list[int]:
        """The prompt, after dropping the oldest turns until a reply fits the window."""
        window = self.model.config.max_seq_len
        budget = max(1, window - min(self.max_new_tokens, window // 2))
        ids = self.prompt_ids()
        while len(ids) > budget and len(self.messages) > 1:
            pair = self.messages[0]["role"] == "user" and len(self.messages) > 2
            self.messages = self.messages[2:] if pair else self.messages[1:]  # a user turn and its reply
            self.dropped_turns += 1
            ids = self.prompt_ids()
        if len(ids) > budget:  # one message alone is too long: keep its end
            ids = ids[-budget:]
        return ids

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user turn and generate the assistant's reply (streamed through on_text)."""
        return self._turn_with([*self.messages, {"role": "user", "content": user_text}], on_text)

    def regenerate(self, on_text: Callable[[str], None] | None = None) -> str:
        """A new reply to the last user turn."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise TformerError("nothing to regenerate yet")
        return self._turn_with(self.messages[:-1], on_text)

    def _turn_with(self, messages: list[dict[str, str]], on_text: Callable[[str], None] | None) -> str:
        """Reply to messages; an interrupted or failed turn leaves the conversation as it was."""
        saved = self.messages, self.dropped_turns
        self.messages = messages
        try:
            return self._respond(on_text)
        except BaseException:
            self.messages, self.dropped_turns = saved
            raise

    def _respond(self, on_text: Callable[[str], None] | None) -> str:
        ids = self._fit()
        reuse = min(_common_prefix(self.cached, ids), len(ids) - 1)
        self.cached = []  # until this turn completes, the cache is not trusted
        self._turn += 1
        seed = None if self.seed is None else self.seed + self._turn
        stops = PLAIN_STOPS if self.mode == "plain" else ()
        sink = (lambda _row, text: on_text(text)) if on_text else None
        (done,), stats = generate(
            self.model, self.tok, [ids], self.sampling, self.max_new_tokens, stops=stops, seed=seed,
            on_text=sink, cache=self.cache, reuse=reuse,
        )
        self.cached = done.context
        text = done.text.strip() if self.mode == "plain" else done.text
        self.messages.append({"role": "assistant", "content": text})
        self.last = TurnStats(len(done.ids), len(ids) - reuse, reuse, stats)
        return text

    def reset(self) -> None:
        self.messages.clear()
        self.cached = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    # -- transcripts -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the transcript as JSON: {"system": ..., "messages": [{"role", "content"}, ...]}."""
        data = {"system": self.system, "messages": self.messages}
        try:
            Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            raise TformerError(f"{path}: cannot write the transcript ({e.strerror})") from None

    def load(self, path: str | Path) -> None:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            messages = data["messages"]
            if not all(m["role"] in ("user", "assistant") and isinstance(m["content"], str) for m in messages):
                raise ValueError
        except FileNotFoundError:
            raise TformerError(f"{path}: no such transcript") from None
        except OSError as e:
            raise TformerError(f"{path}: cannot read the transcript ({e.strerror})") from None
        except (ValueError, KeyError, TypeError):
            raise TformerError(f"{path}: not a tformer chat transcript (JSON with \"messages\")") from None
        self.system, self.messages, self.cached = data.get("system"), messages, []
