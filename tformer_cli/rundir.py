"""Run directories: the contract between commands (see DESIGN.md, "Checkpoint directory")."""

from __future__ import annotations

import json
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
CHECKPOINT_FILES = (WEIGHTS_FILE, ADAPTER_FILE)


def read_dir_config(path: str | Path) -> dict[str, Any] | None:
    """directory/config.json as a dict, or None when it is missing or not a JSON object."""
    try:
        data = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_run_dir(path: str | Path) -> bool:
    """A tformer run (or one in the making): config.json says "format": "tformer"."""
    data = read_dir_config(path)
    return data is not None and data.get("format") == "tformer"


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory: its config.json names a model_type (tformer's never does)."""
    data = read_dir_config(path)
    return data is not None and data.get("format") != "tformer" and "model_type" in data


def holds_checkpoint(run_dir: str | Path) -> bool:
    """Whether run_dir holds trained weights a new run must not replace silently.

    A resumable state, the latest weights (full or LoRA), or the best ones (written at evals, so
    they can exist before the first latest checkpoint). A directory with none of these is an
    unfinished start: what it holds is rebuilt by the next run.
    """
    run_dir = Path(run_dir)
    if (run_dir / TRAIN_STATE_DIR / "state.json").is_file():
        return True
    return any((d / name).is_file() for d in (run_dir, run_dir / BEST_DIR) for name in CHECKPOINT_FILES)


def check_run_dir(path: str | Path, tokenizer: bool = True) -> Path:
    """The run directory as a Path, or a TformerError saying what is missing.

    A Hugging Face Llama directory passes too: load_run_model reads it in place. tokenizer=False
    accepts a run without tokenizer.model (profiling needs only the config and the weights).
    """
    path = Path(path)
    if not path.is_dir():
        raise TformerError(f"{path}: no such run directory; train one with `tformer train CORPUS -o {path}`")
    if is_hf_dir(path):
        from tformer_cli.import_hf import check_hf_llama  # import_hf builds on this module

        check_hf_llama(path)
        return path
    weights = WEIGHTS_FILE
    if (path / CONFIG_FILE).is_file() and not (path / WEIGHTS_FILE).exists() and (path / ADAPTER_FILE).exists():
        weights = ADAPTER_FILE  # an unmerged LoRA fine-tune: base run + adapter
    for name in (CONFIG_FILE, weights, *((TOKENIZER_FILE,) if tokenizer else ())):
        if not (path / name).is_file():
            raise TformerError(f"{path}: incomplete run directory, {name} is missing")
    return path


def load_run_model(path: str | Path) -> tuple[Transformer, dict[str, Any]]:
    """The plain model of a run directory (a LoRA run is its base with the adapter merged in)."""
    path = check_run_dir(path)
    if is_hf_dir(path):
        from tformer_cli.import_hf import read_hf_llama

        # Read in place, never written to: the same conversion as `tformer import`, in memory.
        hf = read_hf_llama(path)
        return hf.model, {"format": "hf-llama", "imported_from": str(path.resolve()),
                          "source_dtype": hf.source_dtype}
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
