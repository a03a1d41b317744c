"""Shared fixtures: an in-process CLI runner, a private cache, and a guard on what tests read.

Tests are self-contained: the data they need is built by tests/fixtures.py from text every
Python has. The guard below fails any test that opens a file in ../shared (which only our own
machines have beside the repository), so a test that needs it cannot pass here and fail on a
user's clone.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def _forbid_shared(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(str(SHARED) + os.sep):
            raise PermissionError(f"tests must not read {path}: a user's clone has no ../shared")


sys.addaudithook(_forbid_shared)


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str, stdin: str | None = None) -> Result:
    """Run `tformer ARGS` in this process through the real entry point (error handling included)."""
    from tformer_cli.app import main

    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr, sys.stdin
    sys.stdout, sys.stderr = out, err
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdout, sys.stderr, sys.stdin = old
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """tformer's cache (tokenised corpora) lives in a temporary folder, not in ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TFORMER_CACHE", str(tmp_path_factory.mktemp("tformer-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
