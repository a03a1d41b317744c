"""Runs of every kind for the eval and runs tests, built once per session: a pretrained run (fp32,
trained at seq-len 64 with evals that cover its validation split several times over), a LoRA
fine-tune of it, and the same run exported to Hugging Face and imported back."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fixtures import write_corpus, write_instructions

from tformer_cli.interop.hf_export import export_hf
from tformer_cli.interop.hf_import import import_hf
from tformer_cli.training.config import TrainConfig
from tformer_cli.training.finetune import FinetuneOptions, finetune
from tformer_cli.training.pretrain import train

SEQ_LEN = 64


@dataclass(frozen=True)
class Runs:
    root: Path
    corpus: Path
    pretrain: Path
    lora: Path
    hf: Path  # the pretrained run exported: a Hugging Face Llama directory
    imported: Path
    card: dict


@functools.cache
def eval_runs() -> Runs:
    root = Path(tempfile.mkdtemp(prefix="tformer-eval-"))
    atexit.register(shutil.rmtree, root, True)
    corpus = write_corpus(root / "data" / "corpus.txt", 120_000)
    runs = root / "runs"
    cfg = TrainConfig(
        preset="nano",
        model={"max_seq_len": SEQ_LEN},
        vocab_size=512,
        batch_size=8,
        seq_len=SEQ_LEN,
        max_steps=60,
        lr=3e-3,
        eval_every=30,
        eval_batches=40,  # 320 windows: the card's figure is the split's, not a sample's
        sample_every=0,
        precision="fp32",
        device="cpu",
    )
    card = train(cfg, [corpus], runs / "pretrain", root / "cache")
    ft = TrainConfig(
        max_steps=4, batch_size=4, lr=3e-3, eval_every=100, eval_batches=1, precision="fp32"
    )
    data = write_instructions(root / "data" / "instructions.jsonl", 60)
    finetune(ft, FinetuneOptions(rank=4), runs / "pretrain", [data], runs / "lora")
    export_hf(runs / "pretrain", root / "export" / "hf")
    import_hf(root / "export" / "hf", runs / "imported")
    return Runs(
        root,
        corpus,
        runs / "pretrain",
        runs / "lora",
        root / "export" / "hf",
        runs / "imported",
        card,
    )
