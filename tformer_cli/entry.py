"""The console script's entry point: the only code that runs before the app's modules load.

Importing the app pulls in torch and friends, which takes a second or two; a Ctrl-C in that
time must end the command like a Ctrl-C at any other moment (exit 130, no traceback), so the
import itself happens inside the guard.
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C


def main(argv: list[str] | None = None) -> None:
    """Load the app and run it; Ctrl-C at any point exits 130 with one line."""
    try:
        from tformer_cli.app import main as run_app

        run_app(argv)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        raise SystemExit(INTERRUPTED) from None
