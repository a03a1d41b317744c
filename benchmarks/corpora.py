"""Text for the benchmarks' tokenizers: tinyshakespeare where ../shared has it, else the Python
documentation every Python ships (as `make demo` uses)."""

from __future__ import annotations

from pathlib import Path

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def benchmark_corpus(directory: Path) -> Path:
    """tinyshakespeare when ../shared has it, else the Python docs written into directory."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE
    from pydoc_data.topics import topics

    path = directory / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    return path
