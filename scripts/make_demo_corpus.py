"""Write a demo corpus from text every Python install has: the standard library's help topics.

`pydoc_data.topics` holds the Python reference documentation as plain English (about 0.5 MB),
so `make demo` needs no download.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: str) -> None:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text, encoding="utf-8")
    print(
        f"wrote {out}: {len(text.encode()):,} bytes from pydoc_data.topics ({len(topics)} topics)"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo/corpus.txt")
