"""Training settings: defaults, a TOML file, then command-line flags, in that order of precedence."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models import ConfigError, ModelConfig, get_preset
from tformer_cli.errors import TformerError

# The model `tformer train` builds when no --preset (or --config preset) is given; `tformer profile`
# without a model profiles the same one.
DEFAULT_PRESET = "micro"


@dataclass
class TrainConfig:
    """Everything `tformer train` needs besides the corpus and the run directory."""

    preset: str = DEFAULT_PRESET
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields over the preset
    tokenizer: str | None = None  # an existing tokenizer.model; None trains one
    vocab_size: int | None = None  # for a trained tokenizer; None picks by corpus size
    batch_size: int = 16  # sequences per optimizer step, across all processes
    grad_accum: int = 1
    seq_len: int | None = None  # None: the model's context, at most 256
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup: int | None = None  # None: 5% of the steps, 10 to 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float | None = None
    max_steps: int | None = None  # None: 1000, or as many as --time allows
    time: float | None = None  # wall-clock budget in seconds
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    fsdp: bool = False
    seed: int = 1337
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 500
    log_every: int = 10
    sample_every: int | None = None  # None: at every eval; 0: never
    val_fraction: float = 0.1

    def validate(self) -> None:
        positive = ("batch_size", "grad_accum", "eval_every", "eval_batches", "save_every", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise TformerError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "seq_len", "vocab_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise TformerError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.lr <= 0 or (self.min_lr is not None and not 0 <= self.min_lr <= self.lr):
            raise TformerError("--lr must be positive and --min-lr between 0 and --lr")
        if self.time is not None and self.time <= 0:
            raise TformerError("--time must be a positive duration such as 90s, 10m or 1h")
        if not 0 < self.val_fraction < 0.5:
            raise TformerError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        self.model_config(vocab_size=256)  # an unknown preset or a bad [model] field fails before any work
        if self.batch_size % self.grad_accum:
            raise TformerError(
                f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}"
            )

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model to train: the preset, the [model] overrides, then vocab, context and dropout."""
        overrides = dict(self.model)
        overrides["vocab_size"] = vocab_size
        if self.dropout is not None:
            overrides["dropout"] = self.dropout
        try:
            cfg = get_preset(self.preset, **overrides)
            if self.seq_len is not None and self.seq_len > cfg.max_seq_len:
                cfg = cfg.replace(max_seq_len=self.seq_len)
        except ConfigError as e:
            raise TformerError(str(e)) from None
        return cfg

    def context(self, cfg: ModelConfig) -> int:
        return self.seq_len or min(cfg.max_seq_len, 256)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*$")


def parse_duration(text: str) -> float:
    """Seconds in '90', '90s', '10m', '1.5h'."""
    match = _DURATION.match(text)
    if not match:
        raise TformerError(f"--time {text!r}: use a duration such as 90s, 10m or 1h")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]


def read_settings_file(path: Path) -> dict[str, Any]:
    """A TOML settings file (tomllib on 3.11+, tomli before), or JSON when the name ends in .json."""
    if not path.is_file():
        raise TformerError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TformerError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise TformerError(f"{path}: invalid TOML: {e}") from None
    if not isinstance(data, dict):
        raise TformerError(f"{path}: expected a table of settings")
    return data


def load_train_config(path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the TOML file's [train] and [model] tables (and top-level preset), then flags.

    overrides holds only the flags the user gave (None values are ignored).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = read_settings_file(path)
        unknown_tables = set(raw) - {"train", "model", "preset"}
        if unknown_tables:
            raise TformerError(f"{path}: unknown table(s) {', '.join(sorted(unknown_tables))}; use [train] and [model]")
        data.update(raw.get("train", {}))
        if "preset" in raw:
            data["preset"] = raw["preset"]
        if "model" in raw:
            data["model"] = raw["model"]
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TformerError(f"{path}: unknown [train] setting(s) {', '.join(unknown)}")
        if isinstance(data.get("time"), str):
            data["time"] = parse_duration(data["time"])
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**data)
    cfg.validate()
    return cfg


def default_vocab_size(corpus_bytes: int) -> int:
    """A tokenizer size that suits the corpus: small corpora cannot fill a large vocabulary."""
    if corpus_bytes < 4 << 20:
        return 2048
    if corpus_bytes < 64 << 20:
        return 8192
    return 32000
