"""Building small run directories for tests, without training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from models import Transformer, get_preset, save_model
from tformer_cli.tokenizer import train_tokenizer


def make_tokenizer(corpus_text: str, path: Path, vocab_size: int = 400) -> Path:
    corpus = path.with_suffix(".txt")
    corpus.write_text(corpus_text, encoding="utf-8")
    return train_tokenizer([corpus], path, vocab_size=vocab_size).path


def make_run(directory: Path, tokenizer: Path, seed: int = 0, chat: bool = False, **model) -> Path:
    """A run dir with a random model of the nano shape (overridable) and the given tokenizer."""
    from tformer_cli.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer).vocab_size
    torch.manual_seed(seed)
    net = Transformer(get_preset("nano", **{"vocab_size": vocab, **model}))
    save_model(net, directory, extra={"chat": True} if chat else None)
    shutil.copyfile(tokenizer, Path(directory) / "tokenizer.model")
    return Path(directory)


def read_config(directory: Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())
