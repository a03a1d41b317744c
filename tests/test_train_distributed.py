"""torchrun with 2 CPU processes (gloo) trains the same model as one process with the same global
batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import run_cli
from fixtures import write_corpus
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    corpus = write_corpus(base / "corpus.txt", 60_000)
    res = run_cli("tokenize", "train", corpus, "-o", base / "tok.model", "--vocab-size", "400")
    assert res.exit_code == 0, res.stderr
    return base, corpus


ARGS = [
    "--preset",
    "nano",
    "--precision",
    "fp32",
    "--batch-size",
    "8",
    "--seq-len",
    "32",
    "--max-steps",
    "6",
    "--eval-every",
    "3",
    "--eval-batches",
    "2",
    "--dropout",
    "0",
    "--quiet",
]


def test_two_gloo_processes_match_one_process(setup):
    base, corpus = setup
    common = [
        str(corpus),
        "--tokenizer",
        str(base / "tok.model"),
        "--cache-dir",
        str(base / "cache"),
        *ARGS,
    ]
    res = run_cli("train", *common, "-o", base / "single")
    assert res.exit_code == 0, res.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tformer_cli",
        "train",
        *common,
        "-o",
        str(base / "ddp"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    single, ddp = (
        load_file(base / "single" / "model.safetensors"),
        load_file(base / "ddp" / "model.safetensors"),
    )
    assert single.keys() == ddp.keys()
    diff = max((single[k] - ddp[k]).abs().max().item() for k in single)
    assert diff < 1e-4, diff
    # Only rank 0 writes: one line per logged step, not two.
    import json

    steps = [
        json.loads(line)["step"]
        for line in (base / "ddp" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [3, 6, 6]  # eval at 3, then the last step logged and evaluated
