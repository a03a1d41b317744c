"""Fine-tuning data: records in several formats -> token ids with a loss mask -> padded batches.

Formats, detected per record (JSONL, a JSON array, or plain .txt):
    multi-turn chat {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    Alpaca          {"instruction": "...", "input": "...", "output": "..."}
    prompt          {"prompt": "...", "completion": "..."}
    plain text      {"text": "..."}, or a .txt file (continued pretraining)
The first three go through the chat template with loss on the assistant's tokens only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tformer_cli.data.chat_template import ROLES, encode_chat_with_mask
from tformer_cli.data.tokenizer import Tokenizer
from tformer_cli.errors import TformerError, decode_utf8, parse_json
from tformer_cli.training.loss import IGNORE
from tformer_cli.units import human_bytes

FORMATS = {
    "messages": ({"messages"}, set()),
    "alpaca": ({"instruction", "output"}, {"input"}),
    "prompt": ({"prompt", "completion"}, set()),
    "text": ({"text"}, set()),
}


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # True where the token is a training target


RECORD_LIMIT = 1 << 20  # bytes in one JSONL line (one record); a .txt file is read up to this much
JSON_LIMIT = 64 << 20  # a .json array is parsed whole, so it is bounded; JSONL has no file limit


def read_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) pairs of a data file, streamed; where is "file:line" for JSONL.

    JSONL is read a line at a time, each line at most RECORD_LIMIT bytes, so memory stays
    bounded by the records kept, whatever the file's size. Only the first window of a text is
    ever trained on, so a .txt file is read up to RECORD_LIMIT bytes.
    """
    if not path.is_file():
        raise TformerError(f"{path}: no such data file")
    if path.suffix == ".txt":
        with open(path, "rb") as f:
            text = _utf8(f.read(RECORD_LIMIT), str(path), cut_ok=True)
        if text.strip():
            yield str(path), {"text": text}
        return
    if path.suffix == ".json":
        if path.stat().st_size > JSON_LIMIT:
            raise TformerError(
                f"{path}: a .json array over {human_bytes(JSON_LIMIT)}; write the records as JSONL "
                "(one per line), which is streamed"
            )
        text = _utf8(path.read_bytes(), str(path))
        data = parse_json(text, path)
        if not isinstance(data, list):
            raise TformerError(f"{path}: a .json data file must hold an array of records")
        for i, r in enumerate(data):
            yield f"{path}: record {i + 1}", r
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(RECORD_LIMIT + 1), b""), start=1):
            where = f"{path}:{lineno}"
            if len(raw) > RECORD_LIMIT:
                raise TformerError(
                    f"{where}: a record longer than {human_bytes(RECORD_LIMIT)}; split it"
                )
            line = _utf8(raw, where)
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise TformerError(
                    f"{where}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})"
                ) from None


def _utf8(data: bytes, where: str, cut_ok: bool = False) -> str:
    """data as text; cut_ok drops a character split at the end of a partial read."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if cut_ok and e.start >= len(data) - 3 and e.reason == "unexpected end of data":
            return data[: e.start].decode("utf-8")
    return decode_utf8(data, where)  # raises, naming the byte


def record_messages(record: object, where: str) -> tuple[str, list[dict[str, str]] | str]:
    """The record's format and its conversation (or its text, for the text format)."""
    if not isinstance(record, dict):
        raise TformerError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    for name, (required, optional) in FORMATS.items():
        if required <= keys:
            extra = keys - required - optional
            if extra:
                raise TformerError(
                    f"{where}: unknown field(s) {', '.join(sorted(extra))} for the {name} format"
                )
            break
    else:
        raise TformerError(
            f"{where}: unknown record with fields {', '.join(sorted(keys)) or '(none)'}; "
            "expected messages, instruction/input/output, prompt/completion or text"
        )
    values = [record[k] for k in required | (optional & keys)]
    if name != "messages" and not all(isinstance(v, str) for v in values):
        raise TformerError(f"{where}: fields of the {name} format must be strings")
    if name == "text":
        return name, record["text"]
    if name == "alpaca":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return name, [
            {"role": "user", "content": user},
            {"role": "assistant", "content": record["output"]},
        ]
    if name == "prompt":
        return name, [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise TformerError(f'{where}: "messages" must be a non-empty list')
    for n, m in enumerate(messages, start=1):
        if (
            not isinstance(m, dict)
            or set(m) != {"role", "content"}
            or not isinstance(m.get("content"), str)
        ):
            raise TformerError(
                f'{where}: message {n} must be an object with exactly "role" and "content" strings'
            )
        if m["role"] not in ROLES:
            raise TformerError(
                f"{where}: message {n} has role {m['role']!r}; roles are system, user, assistant"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise TformerError(f"{where}: the conversation has no assistant message to learn from")
    return name, messages


def to_example(
    tok: Tokenizer, record: object, where: str, train_on_prompt: bool = False
) -> Example:
    """Token ids and loss mask of one record."""
    name, content = record_messages(record, where)
    if name == "text":
        ids = [tok.bos_id, *tok.encode(content), tok.eos_id]
        return Example(ids, [False] + [True] * (len(ids) - 1))
    if not tok.has_chat_markers:
        raise TformerError(
            f"{where}: a {name} record needs the chat markers, which the base's tokenizer lacks "
            '(an imported model, say); fine-tune it on text data ({"text": ...} or .txt) instead'
        )
    ids, mask = encode_chat_with_mask(tok, content)
    if train_on_prompt:
        mask = [False] + [True] * (len(ids) - 1)
    return Example(ids, mask)


def load_examples(
    paths: list[Path], tok: Tokenizer, train_on_prompt: bool = False
) -> list[Example]:
    """Every record of the files as an example; those with no target token are left out."""
    examples = []
    for path in paths:
        for where, record in read_records(Path(path)):
            examples.append(to_example(tok, record, where, train_on_prompt))
    examples = [e for e in examples if any(e.mask[1:])]
    if not examples:
        raise TformerError(
            f"{', '.join(map(str, paths))}: no examples with anything to learn "
            "(the data set is empty)"
        )
    return examples


class ExampleBatches:
    """Padded (x, y) batches of examples, shuffled per epoch, reproducible from (seed, step)."""

    def __init__(
        self, examples: list[Example], seq_len: int, pad_id: int, seed: int, shuffle: bool = True
    ):
        self.truncated = sum(len(e.ids) > seq_len + 1 for e in examples)
        # An example cut before its first target would only add padding: leave it out.
        kept = [e for e in examples if any(e.mask[1 : seq_len + 1])]
        if not kept:
            raise TformerError(
                f"no example has a token to learn within --seq-len {seq_len}; "
                "use a longer --seq-len"
            )
        self.dropped = len(examples) - len(kept)
        self.examples, self.seq_len, self.pad_id, self.seed, self.shuffle = (
            kept,
            seq_len,
            pad_id,
            seed,
            shuffle,
        )

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return (
            np.random.default_rng([self.seed, epoch]).permutation(n)
            if self.shuffle
            else np.arange(n)
        )

    def batch(
        self, step: int, batch_size: int, part: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `part` of step's batch: x (n, seq_len) padded with pad, y with IGNORE where
        there is no loss."""
        n = len(self.examples)
        picks = []
        for k in range(step * batch_size, (step + 1) * batch_size)[part]:
            picks.append(self.examples[self._order(k // n)[k % n]])
        x = torch.full((len(picks), self.seq_len), self.pad_id, dtype=torch.long)
        y = torch.full((len(picks), self.seq_len), IGNORE, dtype=torch.long)
        for row, e in enumerate(picks):
            ids, mask = e.ids[: self.seq_len + 1], e.mask[: self.seq_len + 1]
            t = len(ids) - 1
            x[row, :t] = torch.tensor(ids[:-1])
            y[row, :t] = torch.tensor(
                [i if m else IGNORE for i, m in zip(ids[1:], mask[1:], strict=True)]
            )
        return x, y
