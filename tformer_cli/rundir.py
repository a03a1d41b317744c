"""Run directories: the contract between commands (see DESIGN.md, "Checkpoint directory")."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import Transformer
from models.config import ModelConfig
from models.weights import CONFIG_FILE, WEIGHTS_FILE, load_weights, read_config_file
from tformer_cli.errors import TformerError
from tformer_cli.tokenizer import Tokenizer, load_tokenizer

TOKENIZER_FILE = "tokenizer.model"
METRICS_FILE = "metrics.jsonl"
TRAIN_STATE_DIR = "train_state"
BEST_DIR = "best"


@dataclass
class Run:
    """A loaded run directory: the model (eval mode), its tokenizer and its config.json."""

    path: Path
    model: Transformer
    tokenizer: Tokenizer
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def check_run_dir(path: str | Path) -> Path:
    """The run directory as a Path, or a TformerError saying what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise TformerError(f"{path}: no such run directory; train one with `tformer train CORPUS -o {path}`")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise TformerError(f"{path}: incomplete run directory, {name} is missing")
    return path


def load_run(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Run:
    """Load the model and tokenizer of a run directory for inference."""
    path = check_run_dir(path)
    info = read_config_file(path)
    config = ModelConfig.from_dict(info["model"])
    tokenizer = load_tokenizer(path / TOKENIZER_FILE)
    if tokenizer.vocab_size > config.vocab_size:
        raise TformerError(
            f"{path}: tokenizer.model has {tokenizer.vocab_size} tokens but the model embeds only "
            f"{config.vocab_size}; the tokenizer does not belong to this model"
        )
    model = Transformer(config)
    load_weights(model, path / WEIGHTS_FILE)
    model = model.to(device=device, dtype=dtype).eval()
    return Run(path=path, model=model, tokenizer=tokenizer, info=info)
