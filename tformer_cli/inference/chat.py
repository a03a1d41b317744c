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
from tformer_cli.data.chat_template import PLAIN_STOPS, encode_chat, plain_transcript
from tformer_cli.data.tokenizer import Tokenizer
from tformer_cli.errors import TformerError
from tformer_cli.inference.engine import GenerationStats
from tformer_cli.inference.sampling import SamplingConfig
from tformer_cli.inference.text import generate
from tformer_cli.units import human_bytes

TRANSCRIPT_LIMIT = 16 << 20  # bytes: /load refuses larger files (and never reads past this)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def chat_mode(info: dict, tokenizer: Tokenizer) -> str:
    """How a run is prompted: "chat" (the template's markers) for a model fine-tuned for chat
    whose tokenizer has them (info is its config.json's run info), else "plain" (a transcript)."""
    return "chat" if info.get("chat") and tokenizer.has_chat_markers else "plain"


def render_prompt(tok: Tokenizer, mode: str, messages: list[dict[str, str]]) -> list[int]:
    """The prompt for a reply after messages (system, user and assistant turns, in order): the
    chat template in "chat" mode, BOS and a plain transcript in "plain" mode. What `tformer chat`
    and `tformer serve` send to the model."""
    if mode == "chat":
        return encode_chat(tok, messages)
    return [tok.bos_id, *tok.encode(plain_transcript(messages))]


@dataclass
class TurnStats:
    """One reply: its tokens, how much of its prompt was prefilled or reused, the timings."""

    reply_tokens: int
    prefilled_tokens: int
    reused_tokens: int
    generation: GenerationStats


class ChatSession:
    """Conversation state for `tformer chat`; mode is "chat" (markers) or "plain" (transcript)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        mode: str,
        sampling: SamplingConfig,
        max_new_tokens: int = 256,
        system: str | None = None,
        seed: int | None = None,
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
        self._lengths: dict[tuple[str, str], int] = {}

    # -- the conversation ------------------------------------------------------------------------

    def conversation(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def prompt_ids(self) -> list[int]:
        return self.prompt_ids_for(self.messages)

    def prompt_ids_for(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt for a reply after these messages (the system prompt comes first)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return render_prompt(self.tok, self.mode, system + messages)

    def _message_tokens(self, message: dict[str, str]) -> int:
        """About how many tokens a message adds to the prompt (exact in chat mode), memoised."""
        return self._lengths[(message["role"], message["content"])]

    def _measure(self, messages: list[dict[str, str]]) -> None:
        """Encode the messages not measured yet, in one multi-threaded batch."""
        new = list({(m["role"], m["content"]) for m in messages} - self._lengths.keys())
        for key, ids in zip(new, self.tok.encode_batch([c for _, c in new]), strict=True):
            self._lengths[key] = len(ids) + 2  # + role marker and <|end|> (or "User: " and "\n")

    def _fit(self) -> list[int]:
        """The prompt, after dropping the oldest turns until a reply fits the window.

        Each message is encoded once (its length is remembered), and the number of turns to
        drop is found by walking the lengths, so fitting costs linear time in the conversation's
        length even for a loaded transcript of thousands of messages.
        """
        window = self.model.config.max_seq_len
        budget = max(1, window - min(self.max_new_tokens, window // 2))
        self._measure(self.messages)
        fixed = len(self.prompt_ids_for([]))
        total = fixed + sum(self._message_tokens(m) for m in self.messages)
        start = 0  # the first message kept
        while total > budget and len(self.messages) - start > 1:
            n = self._turn_size(start)
            total -= sum(self._message_tokens(m) for m in self.messages[start : start + n])
            start, self.dropped_turns = start + n, self.dropped_turns + 1
        self.messages = self.messages[start:]
        ids = self.prompt_ids()
        while len(ids) > budget and len(self.messages) > 1:  # the estimate was short (plain mode)
            self.messages = self.messages[self._turn_size(0) :]
            self.dropped_turns += 1
            ids = self.prompt_ids()
        if len(ids) > budget:  # one message alone is too long: keep its end
            ids = ids[-budget:]
        return ids

    def _turn_size(self, start: int) -> int:
        """How many messages from start the oldest turn spans: a user turn and its reply, or one."""
        return 2 if self.messages[start]["role"] == "user" and len(self.messages) - start > 2 else 1

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user turn and generate the assistant's reply (streamed through on_text)."""
        return self._turn_with([*self.messages, {"role": "user", "content": user_text}], on_text)

    def regenerate(self, on_text: Callable[[str], None] | None = None) -> str:
        """A new reply to the last user turn."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise TformerError("nothing to regenerate yet")
        return self._turn_with(self.messages[:-1], on_text)

    def _turn_with(
        self, messages: list[dict[str, str]], on_text: Callable[[str], None] | None
    ) -> str:
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
            self.model,
            self.tok,
            [ids],
            self.sampling,
            self.max_new_tokens,
            stops=stops,
            seed=seed,
            on_text=sink,
            cache=self.cache,
            reuse=reuse,
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
            Path(path).write_text(
                json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        except OSError as e:
            raise TformerError(f"{path}: cannot write the transcript ({e.strerror})") from None

    def load(self, path: str | Path) -> None:
        """Replace the conversation with a saved transcript (checked whole before any change)."""
        data = read_transcript(Path(path))
        self.system, self.messages, self.cached = data["system"], data["messages"], []


def read_transcript(path: Path) -> dict:
    """{"system": str | None, "messages": [{"role", "content"}, ...]} from a /save file.

    Only regular files up to TRANSCRIPT_LIMIT bytes are read (never /dev/zero or a pipe that
    does not end), and every field is checked, so a loaded transcript cannot fail a later turn.
    Anything else is a TformerError.
    """
    raw = _read_bounded(path)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TformerError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    except ValueError as e:
        raise TformerError(f"{path}: not JSON ({e})") from None
    return _checked_transcript(data, f"{path}: not a tformer chat transcript")


def _read_bounded(path: Path) -> bytes:
    """The bytes of a regular file of at most TRANSCRIPT_LIMIT bytes."""
    limit = f"the transcript limit of {human_bytes(TRANSCRIPT_LIMIT)}"
    try:
        if not path.is_file():
            raise TformerError(
                f"{path}: no such transcript"
                if not path.exists()
                else f"{path}: not a regular file; /load reads a transcript saved with /save"
            )
        if path.stat().st_size > TRANSCRIPT_LIMIT:
            raise TformerError(f"{path}: {path.stat().st_size:,} bytes is over {limit}")
        with open(path, "rb") as f:
            raw = f.read(TRANSCRIPT_LIMIT + 1)
    except OSError as e:
        raise TformerError(f"{path}: cannot read the transcript ({e.strerror})") from None
    if len(raw) > TRANSCRIPT_LIMIT:  # it grew while being read
        raise TformerError(f"{path}: over {limit}")
    return raw


def _checked_transcript(data, what: str) -> dict:
    """The transcript in data, every field checked; what begins each error."""
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise TformerError(f'{what} (JSON with a "messages" list)')
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise TformerError(
            f'{what}: "system" must be a string or null, got {type(system).__name__}'
        )
    for n, m in enumerate(data["messages"], start=1):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise TformerError(
                f"{what}: message {n} must be "
                '{"role": "user" or "assistant", "content": a string}'
            )
    messages = [{"role": m["role"], "content": m["content"]} for m in data["messages"]]
    for n, text in enumerate([system or "", *(m["content"] for m in messages)]):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON can spell a lone surrogate ("\\udcff"); no text holds one
            where = '"system"' if n == 0 else f"message {n}"
            raise TformerError(
                f"{what}: {where} holds an escaped lone surrogate, which is not text"
            ) from None
    return {"system": system or None, "messages": messages}
