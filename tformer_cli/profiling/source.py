"""Which model to profile: a run directory, a named preset, or a TOML/JSON config file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models import CheckpointError, ConfigError, ModelConfig, Transformer, get_preset
from models.weights import WEIGHTS_FILE, load_config, load_weights
from tformer_cli.errors import TformerError
from tformer_cli.runs.locate import resolve_model_path
from tformer_cli.runs.rundir import is_hf_dir
from tformer_cli.training.config import DEFAULT_PRESET, read_settings_file


@dataclass
class ModelSource:
    """A model config and where it came from; build() makes the network to measure."""

    config: ModelConfig
    kind: str  # "run", "preset" or "config"
    label: str
    path: Path | None = None
    checkpoint_params: int | None = None  # elements stored in the run's weights file
    preset: str | None = None  # the preset's name when kind is "preset"
    default: bool = False  # no model was named: the default preset of `tformer train`

    def build(self, max_seq_len: int | None = None) -> Transformer:
        """The network, its context window raised to max_seq_len if given: a run's own weights,
        else a seeded init."""
        cfg = self.config
        if max_seq_len is not None and max_seq_len > cfg.max_seq_len:
            # rope/sinusoidal tables only: no weight changes shape
            cfg = cfg.replace(max_seq_len=max_seq_len)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Transformer(cfg)
        if self.kind == "run":
            assert self.path is not None
            if (self.path / WEIGHTS_FILE).is_file() and not is_hf_dir(self.path):
                load_weights(model, self.path / WEIGHTS_FILE)
            else:  # a LoRA fine-tune (its base + the adapter) or a Hugging Face directory
                from tformer_cli.runs.rundir import load_run_model

                loaded, _ = load_run_model(self.path)
                model.load_state_dict(loaded.state_dict())
        return model


def checkpoint_param_count(path: Path) -> int:
    """Elements in a safetensors file, read from its header (tied weights are stored once)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return sum(_numel(f.get_slice(name).get_shape()) for name in f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); it may be truncated"
        ) from None


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def from_run(path: Path) -> ModelSource:
    """What --model names (see model_path): its config, and the parameter count of its weights."""
    path = resolve_model_path(path, tokenizer=False)  # profiling reads no text
    if is_hf_dir(path):
        from tformer_cli.interop.hf_import import check_hf_llama, hf_weight_files

        count = sum(checkpoint_param_count(f) for f in hf_weight_files(path))
        return ModelSource(
            check_hf_llama(path), "run", str(path), path=path, checkpoint_params=count
        )
    cfg = load_config(path)
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        count = checkpoint_param_count(weights)
    else:
        from tformer_cli.runs.rundir import load_run_model

        count = sum(p.numel() for p in load_run_model(path)[0].parameters())
    return ModelSource(cfg, "run", str(path), path=path, checkpoint_params=count)


def from_preset(name: str, default: bool = False) -> ModelSource:
    """A named preset at its own vocabulary size; default marks the one `tformer train` builds."""
    try:
        return ModelSource(get_preset(name), "preset", name, preset=name, default=default)
    except ConfigError as e:
        raise TformerError(f"--preset: {e}") from None


def from_config_file(path: Path) -> ModelSource:
    """A [model] table of ModelConfig fields; `preset = "name"` (top level or in [model]) starts
    from a preset. TOML, or JSON when the name ends in .json.

    A [train] table is allowed and ignored, so a `tformer train --config` file profiles as is.
    """
    data = read_settings_file(path)
    unknown = sorted(set(data) - {"model", "preset", "train"})
    if unknown:
        raise TformerError(
            f"{path}: unknown key(s) {', '.join(unknown)}; "
            "put ModelConfig fields in a [model] table"
        )
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


def resolve_source(
    model_dir: Path | None, preset: str | None, config_file: Path | None
) -> ModelSource:
    """At most one of -m, --preset, --config; none: the default preset of `tformer train`."""
    given = [
        name
        for name, v in (("-m/--model", model_dir), ("--preset", preset), ("--config", config_file))
        if v
    ]
    if len(given) > 1:
        raise TformerError(
            "tformer profile takes exactly one of -m RUN_DIR, --preset NAME or --config FILE, "
            "or none "
            f"for the default preset of `tformer train` (got {' and '.join(given)})"
        )
    if not given:
        return from_preset(DEFAULT_PRESET, default=True)
    if model_dir is not None:
        return from_run(model_dir)
    if preset is not None:
        return from_preset(preset)
    assert config_file is not None
    return from_config_file(config_file)
