"""Which model to profile: a run directory, a named preset, or a TOML/JSON config file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import CheckpointError, ConfigError, ModelConfig, Transformer, get_preset
from models.weights import CONFIG_FILE, WEIGHTS_FILE, load_config, load_weights
from tformer_cli.errors import TformerError
from tformer_cli.train_config import read_settings_file


@dataclass
class ModelSource:
    """A model config and where it came from; build() makes the network to measure."""

    config: ModelConfig
    kind: str  # "run", "preset" or "config"
    label: str
    path: Path | None = None
    checkpoint_params: int | None = None  # elements stored in the run's weights file

    def build(self, max_seq_len: int | None = None) -> Transformer:
        """The network, its context window raised to max_seq_len if given; a run's own weights, else a seeded init."""
        cfg = self.config
        if max_seq_len is not None and max_seq_len > cfg.max_seq_len:
            cfg = cfg.replace(max_seq_len=max_seq_len)  # rope/sinusoidal tables only: no weight changes shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Transformer(cfg)
        if self.kind == "run":
            assert self.path is not None
            if (self.path / WEIGHTS_FILE).is_file():
                load_weights(model, self.path / WEIGHTS_FILE)
            else:  # an unmerged LoRA fine-tune: its base with the adapter merged in
                from tformer_cli.rundir import load_run_model

                merged, _ = load_run_model(self.path)
                model.load_state_dict(merged.state_dict())
        return model


def checkpoint_param_count(path: Path) -> int:
    """Elements in a safetensors file, read from its header (tied weights are stored once)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return sum(_numel(f.get_slice(name).get_shape()) for name in f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be truncated") from None


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def from_run(path: Path) -> ModelSource:
    """A run directory: its config.json, and the parameter count of its weights file."""
    if not path.is_dir():
        raise TformerError(f"{path}: no such run directory; train one with `tformer train CORPUS -o {path}`")
    if not (path / CONFIG_FILE).is_file():
        raise TformerError(f"{path}: not a run directory ({CONFIG_FILE} is missing)")
    cfg = load_config(path)
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        count = checkpoint_param_count(weights)
    else:
        from tformer_cli.rundir import load_run_model

        count = sum(p.numel() for p in load_run_model(path)[0].parameters())
    return ModelSource(cfg, "run", str(path), path=path, checkpoint_params=count)


def from_preset(name: str) -> ModelSource:
    try:
        return ModelSource(get_preset(name), "preset", name)
    except ConfigError as e:
        raise TformerError(f"--preset: {e}") from None


def _read_file(path: Path) -> dict[str, Any]:
    """A TOML file, or JSON when the name ends in .json (the format `tformer train --config` reads)."""
    return read_settings_file(path)


def from_config_file(path: Path) -> ModelSource:
    """A [model] table of ModelConfig fields; `preset = "name"` (top level or in [model]) starts from a preset.

    A [train] table is allowed and ignored, so a `tformer train --config` file profiles as is.
    """
    data = _read_file(path)
    unknown = sorted(set(data) - {"model", "preset", "train"})
    if unknown:
        raise TformerError(f"{path}: unknown key(s) {', '.join(unknown)}; put ModelConfig fields in a [model] table")
    fields = data.get("model", {})
    if not isinstance(fields, dict):
        raise TformerError(f"{path}: [model] must be a table of ModelConfig fields")
    fields = dict(fields)
    preset = fields.pop("preset", None) or data.get("preset")
    try:
        cfg = get_preset(preset, **fields) if preset else ModelConfig.from_dict(fields)
    except (ConfigError, TypeError) as e:
        raise TformerError(f"{path}: {e}") from None
    label = f"{path}" + (f" (preset {preset})" if preset else "")
    return ModelSource(cfg, "config", label, path=path)


def resolve_source(model_dir: Path | None, preset: str | None, config_file: Path | None) -> ModelSource:
    """Exactly one of -m, --preset, --config."""
    given = [name for name, v in (("-m/--model", model_dir), ("--preset", preset), ("--config", config_file)) if v]
    if len(given) != 1:
        what = "none was given" if not given else f"got {' and '.join(given)}"
        raise TformerError(f"tformer profile needs exactly one of -m RUN_DIR, --preset NAME or --config FILE ({what})")
    if model_dir is not None:
        return from_run(model_dir)
    if preset is not None:
        return from_preset(preset)
    assert config_file is not None
    return from_config_file(config_file)
