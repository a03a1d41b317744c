"""Run directories: the contract between commands (see DESIGN.md, "Checkpoint directory")."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import CheckpointError, Transformer
from models.config import ModelConfig
from models.lora import apply_lora, lora_state, merge_lora
from models.weights import CONFIG_FILE, WEIGHTS_FILE, load_tensors, load_weights, read_config_file
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


ADAPTER_FILE = "adapter.safetensors"


def check_run_dir(path: str | Path) -> Path:
    """The run directory as a Path, or a TformerError saying what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise TformerError(f"{path}: no such run directory; train one with `tformer train CORPUS -o {path}`")
    weights = WEIGHTS_FILE
    if (path / CONFIG_FILE).is_file() and not (path / WEIGHTS_FILE).exists() and (path / ADAPTER_FILE).exists():
        weights = ADAPTER_FILE  # an unmerged LoRA fine-tune: base run + adapter
    for name in (CONFIG_FILE, weights, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise TformerError(f"{path}: incomplete run directory, {name} is missing")
    return path


def load_run_model(path: str | Path) -> tuple[Transformer, dict[str, Any]]:
    """The plain model of a run directory (a LoRA run is its base with the adapter merged in)."""
    path = check_run_dir(path)
    info = read_config_file(path)
    config = ModelConfig.from_dict(info["model"])
    if (path / WEIGHTS_FILE).is_file():
        model = Transformer(config)
        load_weights(model, path / WEIGHTS_FILE)
        return model, info
    lora = info.get("lora")
    if not lora or "base" not in info:
        raise TformerError(f"{path}: {ADAPTER_FILE} without a \"lora\" section and \"base\" in config.json")
    base_dir = Path(info["base"])
    if not base_dir.is_dir():
        raise TformerError(f"{path}: its base run {base_dir} is gone; a LoRA run needs its base (or merge it with --merge)")
    model, _ = load_run_model(base_dir)
    apply_lora(model, lora["targets"], lora["rank"], lora["alpha"])
    tensors = load_tensors(path / ADAPTER_FILE)
    expected = lora_state(model.state_dict())
    if set(tensors) != set(expected) or any(tensors[k].shape != v.shape for k, v in expected.items()):
        raise CheckpointError(f"{path / ADAPTER_FILE}: does not match the LoRA settings in config.json")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k])
    return merge_lora(model), info


def load_run(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Run:
    """Load the model and tokenizer of a run directory for inference."""
    path = check_run_dir(path)
    tokenizer = load_tokenizer(path / TOKENIZER_FILE)
    model, info = load_run_model(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TformerError(
            f"{path}: tokenizer.model has {tokenizer.vocab_size} tokens but the model embeds only "
            f"{model.config.vocab_size}; the tokenizer does not belong to this model"
        )
    model = model.to(device=device, dtype=dtype).eval()
    return Run(path=path, model=model, tokenizer=tokenizer, info=info)
