"""Test data built from text every Python has, so the suite needs nothing beside the repository.

The corpus is the Python reference documentation that ships with CPython (`pydoc_data.topics`,
about 0.5 MB of English prose and grammar), the same text `make demo` trains on. The
instruction records are made from it too: each asks about one paragraph's topic and answers
with the paragraph. `../shared/data/` is for benchmarks and the README's examples only.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path


@functools.cache
def _topics() -> tuple[tuple[str, str], ...]:
    from pydoc_data.topics import topics

    return tuple((name, topics[name].strip()) for name in sorted(topics))


@functools.cache
def corpus_text(chars: int | None = None) -> str:
    """The first `chars` characters of the reference-documentation corpus (all of it by default)."""
    text = "\n\n".join(body for _, body in _topics()) + "\n"
    return text if chars is None else text[:chars]


def write_corpus(path: Path, chars: int | None = None) -> Path:
    """corpus_text(chars) written as UTF-8 to path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(corpus_text(chars), encoding="utf-8")
    return path


@functools.cache
def instruction_records(n: int = 400) -> tuple[dict[str, str], ...]:
    """n Alpaca-format records {"instruction", "input", "output"}, deterministic, a third with
    an input."""
    records = []
    for name, body in _topics():
        paragraphs = [p.strip() for p in body.split("\n\n") if len(p.strip()) > 80]
        for i, para in enumerate(paragraphs):
            first = para.split("\n", 1)[0][:120]
            if i % 3 == 2:
                rec = {
                    "instruction": f"Explain this line from the notes on '{name}'.",
                    "input": first,
                    "output": para[:300],
                }
            else:
                rec = {
                    "instruction": "What does the Python documentation say about "
                    f"'{name}'? ({i + 1})",
                    "input": "",
                    "output": para[:300],
                }
            records.append(rec)
    if len(records) < n:
        raise ValueError(f"only {len(records)} instruction records can be built, asked for {n}")
    return tuple(records[:: max(1, len(records) // n)][:n])


def write_instructions(path: Path, n: int = 400) -> Path:
    """instruction_records(n) as JSONL."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in instruction_records(n)), encoding="utf-8")
    return path
