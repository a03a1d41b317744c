"""Weights on disk: model.safetensors + config.json, written atomically, validated on load."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.config import ConfigError, ModelConfig
from models.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "tformer"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, foreign or does not match its config."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) for a temporary file beside path, then rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; saved files should not be
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text to path atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes to path atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors to a safetensors file atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file, with a clear error for a missing or damaged one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); "
            "it may be truncated or from another tool"
        ) from None


def untied_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The tensors to store of a state dict: a tied head is the token embedding, stored once
    (as tok_emb.weight; loading ties head.weight back to it)."""
    state = dict(state)
    if config.tie_embeddings:
        state.pop("head.weight", None)
    return state


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The tensors to store of a model (see untied_state)."""
    return untied_state(model.state_dict(), model.config)


def save_model(
    model: Transformer, directory: str | Path, extra: dict[str, Any] | None = None
) -> None:
    """Write model.safetensors and config.json ({"format", "model", **extra}) into directory."""
    save_state(model.state_dict(), model.config, directory, extra)


def save_state(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    directory: str | Path,
    extra: dict[str, Any] | None = None,
) -> None:
    """save_model for a state dict (e.g. one gathered from FSDP), without building a model."""
    directory = Path(directory)
    save_tensors(untied_state(state, config), directory / WEIGHTS_FILE, metadata={"format": "pt"})
    write_config(directory, config, extra)


def write_config(
    directory: str | Path, config: ModelConfig, extra: dict[str, Any] | None = None
) -> None:
    """Write directory/config.json: {"format": "tformer", "model": config, **extra}."""
    data = {"format": FORMAT, "model": config.to_dict(), **(extra or {})}
    atomic_write_text(Path(directory) / CONFIG_FILE, json.dumps(data, indent=2) + "\n")


def read_config_file(directory: str | Path) -> dict[str, Any]:
    """The whole config.json of a tformer directory, checked to be one."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; is {directory} a tformer run directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "model" not in data:
        raise CheckpointError(
            f'{path}: not a tformer config (no "format": "tformer" with a "model" section); '
            "a Hugging Face checkpoint must be imported first"
        )
    return data


def load_config(directory: str | Path) -> ModelConfig:
    """The model config stored in directory/config.json."""
    data = read_config_file(directory)
    try:
        return ModelConfig.from_dict(data["model"])
    except ConfigError as e:
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: {e}") from None


def load_weights(model: Transformer, path: str | Path) -> None:
    """Copy a safetensors file into model, checking names, shapes and dtypes first."""
    tensors = load_tensors(path)
    expected = model_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = [
            f"{what} {_some(names)}"
            for what, names in (("missing", missing), ("unexpected", unexpected))
            if names
        ]
        raise CheckpointError(f"{path}: tensors do not match config.json ({'; '.join(parts)})")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(got.shape)} "
                f"but config.json implies {tuple(want.shape)}"
            )
        if not got.is_floating_point():
            raise CheckpointError(
                f"{path}: {name} has dtype {got.dtype}, expected a floating-point type"
            )
    with torch.no_grad():
        for name, want in expected.items():
            want.copy_(tensors[name])


def _some(names: list[str]) -> str:
    """The first four names, and "..." when there are more."""
    return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """Build the model described by directory/config.json and load directory/model.safetensors."""
    config = load_config(directory)
    model = Transformer(config)
    load_weights(model, Path(directory) / WEIGHTS_FILE)
    return model.to(device=device, dtype=dtype).eval()
