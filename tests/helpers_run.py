"""Building small run directories for tests: a tokenizer trained once per session, a nano model."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch
from fixtures import corpus_text

from models import Transformer, get_preset, save_model
from tformer_cli.data.tokenizer import load_tokenizer, train_tokenizer

CORPUS_CHARS = 100_000  # enough for a 300-600 token vocabulary, trains in well under a second


def make_tokenizer(corpus_text: str, path: Path, vocab_size: int = 400) -> Path:
    corpus = path.with_suffix(".txt")
    corpus.write_text(corpus_text, encoding="utf-8")
    return train_tokenizer([corpus], path, vocab_size=vocab_size).path


@functools.cache
def shared_tokenizer(vocab_size: int = 500) -> Path:
    """A tokenizer trained on a slice of the fixture corpus, once per session and vocab size."""
    directory = Path(tempfile.mkdtemp(prefix="tformer-tok-"))
    atexit.register(shutil.rmtree, directory, True)
    text = corpus_text(CORPUS_CHARS)
    return make_tokenizer(text, directory / f"tok{vocab_size}.model", vocab_size=vocab_size)


def _train_briefly(net: Transformer, tokenizer: Path, steps: int, seq_len: int = 64) -> None:
    """A few AdamW steps on the fixture corpus, so the model's text is less random than its init."""
    tok = load_tokenizer(tokenizer)
    data = torch.tensor(tok.encode(corpus_text(CORPUS_CHARS)))
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (16,), generator=gen)
        x = torch.stack([data[s : s + seq_len] for s in starts])
        y = torch.stack([data[s + 1 : s + seq_len + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def make_run(
    directory: Path,
    tokenizer: Path | None = None,
    seed: int = 0,
    chat: bool = False,
    train_steps: int = 0,
    vocab_size: int | None = None,
    **model,
) -> Path:
    """A run dir with a nano-shaped model (fields overridable) and a tokenizer (the shared one by
    default).

    The model is random, or trained for train_steps steps; vocab_size defaults to the tokenizer's.
    """
    tokenizer = Path(tokenizer) if tokenizer else shared_tokenizer()
    vocab = vocab_size or load_tokenizer(tokenizer).vocab_size
    torch.manual_seed(seed)
    net = Transformer(get_preset("nano", **{"vocab_size": vocab, **model}))
    if train_steps:
        _train_briefly(net, tokenizer, train_steps)
    save_model(net, directory, extra={"chat": True} if chat else None)
    shutil.copyfile(tokenizer, Path(directory) / "tokenizer.model")
    return Path(directory)


def read_config(directory: Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())
