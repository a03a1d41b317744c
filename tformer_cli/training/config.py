"""Training settings: defaults, a TOML file, then command-line flags, in that order of
precedence."""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models import ConfigError, ModelConfig, get_preset
from tformer_cli.errors import TformerError, decode_utf8, parse_json
from tformer_cli.training.auto import AUTO
from tformer_cli.training.auto import BASE_PRESET as AUTO_BASE_PRESET
from tformer_cli.units import human_bytes

# The model `tformer train` builds when no --preset (or --config preset) is given; `tformer profile`
# without a model profiles the same one.
DEFAULT_PRESET = "micro"
MAX_SEED = 2**32 - 1  # numpy's and CUDA's seeds are 32-bit; larger ones would be cut silently
SETTINGS_LIMIT = 1 << 20  # bytes: a settings file is a page of text, never a data file


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
    auto: dict[str, Any] | None = None  # what --preset auto chose, and why (training/auto.py)

    def validate(self) -> None:
        """Raise a TformerError naming the first setting that is out of range."""
        positive = (
            "batch_size",
            "grad_accum",
            "eval_every",
            "eval_batches",
            "save_every",
            "log_every",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise TformerError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "seq_len", "vocab_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise TformerError(f"{_flag(name)} must be positive, got {value}")
        for name in ("warmup", "sample_every"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise TformerError(f"{_flag(name)} must be 0 or more, got {value}")
        for name in (
            "lr",
            "min_lr",
            "weight_decay",
            "grad_clip",
            "dropout",
            "time",
            "val_fraction",
        ):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise TformerError(f"{_flag(name)} must be a finite number, got {value}")
        if self.lr <= 0:
            raise TformerError(f"--lr must be positive, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise TformerError(
                f"--min-lr must be between 0 and --lr ({self.lr}), got {self.min_lr}"
            )
        if self.weight_decay < 0:
            raise TformerError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise TformerError(
                "--grad-clip must be 0 (off) or a positive gradient-norm limit, "
                f"got {self.grad_clip}"
            )
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise TformerError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.seed <= MAX_SEED:
            raise TformerError(f"--seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.time is not None and self.time <= 0:
            raise TformerError("--time must be a positive duration such as 90s, 10m or 1h")
        if not 0 < self.val_fraction < 0.5:
            raise TformerError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.preset == AUTO and self.time is None:
            raise TformerError(
                "--preset auto sizes the model to a time budget: give --time (e.g. --time 10m) "
                "or another preset"
            )
        # an unknown preset or a bad [model] field fails before any work
        self.model_config(vocab_size=256)
        if self.batch_size % self.grad_accum:
            raise TformerError(
                f"--batch-size {self.batch_size} must be a multiple of "
                f"--grad-accum {self.grad_accum}"
            )

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model to train: the preset, the [model] overrides, then vocab, context and
        dropout."""
        overrides = dict(self.model)
        overrides["vocab_size"] = vocab_size
        preset = AUTO_BASE_PRESET if self.preset == AUTO else self.preset  # checked as its base
        if self.dropout is not None:
            overrides["dropout"] = self.dropout
        try:
            cfg = get_preset(preset, **overrides)
            if self.seq_len is not None and self.seq_len > cfg.max_seq_len:
                cfg = cfg.replace(max_seq_len=self.seq_len)
        except ConfigError as e:
            raise TformerError(str(e)) from None
        return cfg

    def context(self, cfg: ModelConfig) -> int:
        """Tokens per training sequence: --seq-len, else the model's context up to 256."""
        return self.seq_len or min(cfg.max_seq_len, 256)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (what config.json records under "train")."""
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
    """A TOML settings file (tomllib on 3.11+, tomli before), or JSON when the name ends in
    .json."""
    if not path.is_file():
        raise TformerError(f"{path}: config file not found")
    with open(path, "rb") as f:
        raw = f.read(SETTINGS_LIMIT + 1)
    if len(raw) > SETTINGS_LIMIT:
        raise TformerError(
            f"{path}: over {human_bytes(SETTINGS_LIMIT)}; a settings file is a few lines of TOML"
        )
    text = decode_utf8(raw, path)
    if path.suffix.lower() == ".json":
        data = parse_json(text, path)
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


_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
_COMMAND_LINE_ONLY = {
    "output": "-o",
    "o": "-o",
    "resume": "--resume",
    "overwrite": "--overwrite",
    "corpus": "the corpus arguments",
    "config": "--config",
    "cache_dir": "--cache-dir",
}


def check_types(values: dict[str, Any], cls: type, where: str) -> None:
    """Raise a TformerError naming the first key whose value has the wrong type for cls's field.

    Types come from the dataclass annotations ("int | None", "float", ...); a bool is not a
    number here, and an int is a fine float.
    """
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, value in values.items():
        kinds = [k.strip() for k in fields.get(key, "").split("|")]
        if value is None and "None" in kinds:
            continue
        allowed = tuple(t for k in kinds for t in _KINDS.get(k, ()))
        if not allowed:
            continue  # a field with a structured type (checked where it is used)
        if isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
            continue
        want = " or ".join(
            {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}[
                k
            ]
            for k in kinds
            if k in _KINDS
        )
        raise TformerError(f"{where} {key} must be {want}, got {value!r}")


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
            raise TformerError(
                f"{path}: unknown table(s) {', '.join(sorted(unknown_tables))}; "
                "use [train] and [model]"
            )
        for table in ("train", "model"):
            if not isinstance(raw.get(table, {}), dict):
                raise TformerError(
                    f"{path}: {table} must be a table ([{table}] with settings under it)"
                )
        data.update(raw.get("train", {}))
        if "preset" in raw:
            data["preset"] = raw["preset"]
        if "model" in raw:
            data["model"] = raw["model"]
        for key, flag in _COMMAND_LINE_ONLY.items():
            if key in data:
                raise TformerError(
                    f"{path}: [train] {key} is not a file setting; give {flag} on the command line"
                )
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TformerError(f"{path}: unknown [train] setting(s) {', '.join(unknown)}")
        if "time" in data:
            data["time"] = _file_duration(data["time"], path)
        check_types(data, TrainConfig, f"{path}: [train]")
        check_types(data.get("model", {}), ModelConfig, f"{path}: [model]")
    data.update({k: v for k, v in overrides.items() if v is not None})
    if data.get("time") is not None and "preset" not in data and not data.get("model"):
        data["preset"] = AUTO  # a budget and no shape: the shape the budget buys
    cfg = TrainConfig(**data)
    cfg.validate()
    return cfg


def config_flags(params: dict[str, Any], **converted: Any) -> dict[str, Any]:
    """A command's parameters that set a TrainConfig field of the same name, then the converted
    ones (flags whose value needs parsing, or whose name differs).

    For load_train_config: a flag left at None is not given.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return {**{k: v for k, v in params.items() if k in fields}, **converted}


def _file_duration(value: Any, path: Path) -> float:
    """[train] time as seconds: a duration string ("90s", "10m") or a number of seconds."""
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except TformerError:
            raise TformerError(
                f'{path}: [train] time {value!r}: use a duration such as "90s", "10m" or "1h"'
            ) from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TformerError(
        f'{path}: [train] time must be a duration such as "90s" or a number of seconds, '
        f"got {value!r}"
    )


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def default_vocab_size(corpus_bytes: int) -> int:
    """A tokenizer size that suits the corpus: small corpora cannot fill a large vocabulary."""
    if corpus_bytes < 4 << 20:
        return 2048
    if corpus_bytes < 64 << 20:
        return 8192
    return 32000
