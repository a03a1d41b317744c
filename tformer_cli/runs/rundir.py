"""Run directories: the contract between commands (see ARCHITECTURE.md).

Every name a run directory holds is spelled here (config.json and model.safetensors belong to
the model and are spelled in models.weights; the lock file in runs.lock, beside its mechanism):

    RUN_DIR/config.json, model.safetensors     the model (models.weights)
            adapter.safetensors                LoRA weights of an unmerged fine-tune
            tokenizer.model                    the sentencepiece model the run trains with
            metrics.jsonl                      one JSON object per logged step or eval
            run_card.json                      the summary `train` and `finetune` print
            train_state/state.json (+ tensors) what --resume needs (training.state)
            best/                              the weights with the lowest validation loss
"""

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
from tformer_cli.data.tokenizer import Tokenizer, load_tokenizer
from tformer_cli.errors import TformerError

TOKENIZER_FILE = "tokenizer.model"
ADAPTER_FILE = "adapter.safetensors"
METRICS_FILE = "metrics.jsonl"
RUN_CARD_FILE = "run_card.json"
TRAIN_STATE_DIR = "train_state"
TRAIN_STATE_FILE = "state.json"  # in TRAIN_STATE_DIR: names the tensor files that belong together
BEST_DIR = "best"
# A tokenizer trained for a new run waits under this name until the run's inputs are known good.
# It has the shape of an interrupted atomic write, so the next start clears it.
STAGED_TOKENIZER = ".tokenizer.model.staged.tmp"
CHECKPOINT_FILES = (WEIGHTS_FILE, ADAPTER_FILE)


def resume_state_file(run_dir: str | Path) -> Path:
    """RUN_DIR/train_state/state.json: a run can be resumed when this file exists."""
    return Path(run_dir) / TRAIN_STATE_DIR / TRAIN_STATE_FILE


@dataclass
class Run:
    """A loaded run directory: the model (eval mode), its tokenizer and its config.json."""

    path: Path
    model: Transformer
    tokenizer: Tokenizer
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        """The model's config."""
        return self.model.config


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
    if resume_state_file(run_dir).is_file():
        return True
    return any(
        (d / name).is_file() for d in (run_dir, run_dir / BEST_DIR) for name in CHECKPOINT_FILES
    )


def check_run_dir(path: str | Path, tokenizer: bool = True) -> Path:
    """The run directory as a Path, or a TformerError saying what is missing.

    A Hugging Face Llama directory passes too: load_run_model reads it in place. tokenizer=False
    accepts a run without tokenizer.model (profiling needs only the config and the weights).
    """
    path = Path(path)
    if not path.is_dir():
        raise TformerError(
            f"{path}: no such run directory; train one with `tformer train CORPUS -o {path}`"
        )
    if is_hf_dir(path):
        from tformer_cli.interop.hf_import import check_hf_llama  # import_hf builds on this module

        check_hf_llama(path)
        return path
    weights = WEIGHTS_FILE
    if (
        (path / CONFIG_FILE).is_file()
        and not (path / WEIGHTS_FILE).exists()
        and (path / ADAPTER_FILE).exists()
    ):
        weights = ADAPTER_FILE  # an unmerged LoRA fine-tune: base run + adapter
    for name in (CONFIG_FILE, weights, *((TOKENIZER_FILE,) if tokenizer else ())):
        if not (path / name).is_file():
            raise TformerError(f"{path}: incomplete run directory, {name} is missing")
    return path


def read_model_config(path: str | Path) -> ModelConfig:
    """The model config of a checked run (or Hugging Face) directory, without its weights."""
    path = Path(path)
    if is_hf_dir(path):
        from tformer_cli.interop.hf_import import check_hf_llama

        return check_hf_llama(path)
    return ModelConfig.from_dict(read_config_file(path)["model"])


def load_run_model(path: str | Path) -> tuple[Transformer, dict[str, Any]]:
    """The plain model of a run directory (a LoRA run is its base with the adapter merged in).

    The run's tokenizer.model is checked to belong to the model (see check_tokenizer), so every
    command that loads a run (generate, chat, export, finetune's base) refuses a foreign one.
    """
    model, info, _ = _load_run_model(Path(path), ())
    return model, info


def _load_run_model(
    path: Path, seen: tuple[Path, ...]
) -> tuple[Transformer, dict[str, Any], Tokenizer]:
    """load_run_model, plus the checked tokenizer; seen holds the LoRA runs that led here."""
    path = check_run_dir(path)
    if is_hf_dir(path):
        from tformer_cli.interop.hf_import import read_hf_llama

        # Read in place, never written to: the same conversion as `tformer import`, in memory.
        hf = read_hf_llama(path)
        return (
            hf.model,
            {
                "format": "hf-llama",
                "imported_from": str(path.resolve()),
                "source_dtype": hf.source_dtype,
            },
            hf.tokenizer,
        )
    info = read_config_file(path)
    config = ModelConfig.from_dict(info["model"])
    tokenizer = check_tokenizer(path, info, config)
    if (path / WEIGHTS_FILE).is_file():
        model = Transformer(config)
        load_weights(model, path / WEIGHTS_FILE)
        return model, info, tokenizer
    return _load_lora_run(path, info, config, seen), info, tokenizer


def _load_lora_run(
    path: Path, info: dict[str, Any], config: ModelConfig, seen: tuple[Path, ...]
) -> Transformer:
    """An unmerged LoRA run's model: its base run (loaded in turn) with the adapter merged in."""
    lora = _lora_section(path, info)
    base_dir = Path(info["base"])
    chain = (*seen, path.resolve())
    if base_dir.resolve() in chain:
        loop = " -> ".join(str(p) for p in (*chain, base_dir.resolve()))
        raise TformerError(
            f'{path / CONFIG_FILE}: "base" makes a cycle of LoRA runs ({loop}); set "base" '
            "to the run this one was fine-tuned from"
        )
    if not base_dir.exists():
        raise TformerError(
            f"{path}: its base run {base_dir} is gone; a LoRA run needs its base "
            "(or merge it with --merge)"
        )
    try:
        check_run_dir(base_dir)
    except TformerError as e:
        raise TformerError(f"{path}: its base run is not usable: {e}") from None
    model, _, _ = _load_run_model(base_dir, chain)
    if model.config != config:
        raise TformerError(
            f"{path}: its base run {base_dir} is not the model it was fine-tuned from (their model "
            'configs differ); point "base" in config.json at the right run'
        )
    try:
        apply_lora(model, lora["targets"], lora["rank"], lora["alpha"])
    except ValueError as e:
        raise TformerError(f'{path / CONFIG_FILE}: "lora": {e}') from None
    tensors = load_tensors(path / ADAPTER_FILE)
    expected = lora_state(model.state_dict())
    if set(tensors) != set(expected) or any(
        tensors[k].shape != v.shape for k, v in expected.items()
    ):
        raise CheckpointError(
            f"{path / ADAPTER_FILE}: does not match the LoRA settings in config.json"
        )
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k])
    return merge_lora(model)


def _lora_section(path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """config.json's "lora" section of an unmerged LoRA run, checked, with "base" a path."""
    lora, base = info.get("lora"), info.get("base")
    if not isinstance(lora, dict) or "base" not in info:
        raise TformerError(
            f'{path}: {ADAPTER_FILE} without a "lora" section and "base" in config.json'
        )
    if not isinstance(base, str) or not base:
        raise TformerError(
            f'{path / CONFIG_FILE}: "base" must be the path of the base run, got {base!r}'
        )
    targets, rank, alpha = lora.get("targets"), lora.get("rank"), lora.get("alpha")
    if (
        not isinstance(targets, list)
        or not targets
        or not all(isinstance(t, str) for t in targets)
        or not isinstance(rank, int)
        or isinstance(rank, bool)
        or rank < 1
        or not isinstance(alpha, (int, float))
        or isinstance(alpha, bool)
    ):
        raise TformerError(
            f'{path / CONFIG_FILE}: "lora" must hold "targets" (a list of names), "rank" '
            '(a positive integer) and "alpha" (a number), as `tformer finetune` writes it'
        )
    return lora


def check_tokenizer(path: Path, info: dict[str, Any], config: ModelConfig) -> Tokenizer:
    """The run's tokenizer.model, or a TformerError when it does not belong to the model.

    A run trained, fine-tuned or imported by tformer records the sha256 of its tokenizer in
    config.json ("tokenizer_sha256"): another file in its place is refused. Whatever was
    recorded, a tokenizer with more ids than the model embeds is refused; one with fewer only
    where that is normal: a model imported from Hugging Face (padded embeddings), or a tokenizer
    whose recorded sha256 proves it is the one the model was trained with.
    """
    tok_path, cfg_path = path / TOKENIZER_FILE, path / CONFIG_FILE
    tokenizer = load_tokenizer(tok_path)
    recorded = info.get("tokenizer_sha256")
    if recorded is not None and recorded != tokenizer.sha256:
        shown = recorded[:12] + "..." if isinstance(recorded, str) else repr(recorded)
        raise TformerError(
            f"{tok_path} does not belong to {cfg_path}: its sha256 {tokenizer.sha256[:12]}... "
            f"differs from the recorded {shown}; copy back the run's own tokenizer"
        )
    if tokenizer.vocab_size > config.vocab_size:
        raise TformerError(
            f"{path}: tokenizer.model has {tokenizer.vocab_size} tokens but the model embeds only "
            f"{config.vocab_size}; the tokenizer does not belong to this model"
        )
    padded = recorded is not None or "imported_from" in info  # fewer ids than rows is normal there
    if tokenizer.vocab_size < config.vocab_size and not padded:
        raise TformerError(
            f"{path}: tokenizer.model has {tokenizer.vocab_size} tokens but the model embeds "
            f"{config.vocab_size}; the tokenizer does not belong to this model (copy back the "
            "run's own tokenizer)"
        )
    return tokenizer


def load_run(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Run:
    """Load the model and tokenizer of a run directory for inference (the tokenizer checked)."""
    path = check_run_dir(path)
    model, info, tokenizer = _load_run_model(path, ())
    model = model.to(device=device, dtype=dtype).eval()
    return Run(path=path, model=model, tokenizer=tokenizer, info=info)
