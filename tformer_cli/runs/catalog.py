"""Finding run directories and describing them: what `tformer runs` lists and plots.

find_runs walks folders for runs (corpus.is_run_output: what tformer writes there), skipping
hidden folders, virtual environments, caches and token directories, and never descending into
a run (its best/ is part of it). describe_run reads one run's config.json and run_card.json into
a row; a file that cannot be read makes that row say so, never the whole listing fail.
loss_series is the one source of the loss curves: the terminal chart, the PNG and the run card's
small chart all draw what it returns from metrics.jsonl.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.config import ModelConfig
from models.weights import CONFIG_FILE
from tformer_cli.data.corpus import is_run_output
from tformer_cli.data.pretokenize import default_cache_dir
from tformer_cli.errors import TformerError
from tformer_cli.runs.rundir import (
    ADAPTER_FILE,
    BEST_DIR,
    METRICS_FILE,
    RUN_CARD_FILE,
    read_dir_config,
)

# Folders that hold software or caches, never runs: not worth walking into.
SKIPPED_DIRS = {"__pycache__", "node_modules", "site-packages", "venv", "env"}
X_AXES = ("tokens", "time")
Y_AXES = ("loss", "bpb")


def find_runs(roots: list[Path]) -> list[Path]:
    """Every run directory at or under the roots, in path order (each once)."""
    found: dict[str, Path] = {}
    cache = os.path.realpath(default_cache_dir())
    for root in roots:
        if not root.is_dir():
            raise TformerError(f"{root}: no such directory")
        for run in _walk(root, cache):
            found.setdefault(os.path.realpath(run), run)
    return sorted(found.values(), key=lambda p: str(p))


def _walk(root: Path, cache: str) -> Iterator[Path]:
    if is_run_output(root):
        yield root
        return
    for directory, subdirs, _ in os.walk(root):
        here, keep = Path(directory), []
        for name in sorted(subdirs):
            path = here / name
            if name.startswith(".") or name in SKIPPED_DIRS or os.path.realpath(path) == cache:
                continue
            if is_run_output(path):
                yield path
            elif not (path / "meta.json").is_file():  # a token directory holds no runs
                keep.append(name)
        subdirs[:] = keep


def run_kind(info: dict[str, Any], run_dir: Path | None = None) -> str:
    """pretrain, LoRA, full fine-tune, imported, or model (weights saved by other means)."""
    if "imported_from" in info:
        return "imported"
    if info.get("finetune") == "lora" or (run_dir and (run_dir / ADAPTER_FILE).is_file()):
        return "LoRA"
    if info.get("finetune") == "full":
        return "full fine-tune"
    return "pretrain" if "train" in info else "model"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or a TformerError saying why it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TformerError(f"{path.name} is missing") from None
    except (OSError, ValueError) as e:
        raise TformerError(f"{path.name} is unreadable ({e})") from None
    if not isinstance(data, dict):
        raise TformerError(f"{path.name} is unreadable (not a JSON object)")
    return data


@dataclass
class RunRow:
    """One run as `tformer runs` lists it; error says what could not be read."""

    path: Path
    name: str
    kind: str = "-"
    base: str | None = None
    params: int | None = None
    steps: int | None = None
    tokens_seen: int | None = None
    wall_seconds: float | None = None
    best_val_loss: float | None = None
    best_val_bpb: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    date: datetime.datetime | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON values (the date in ISO 8601)."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "notes"}
        data["path"] = str(self.path)
        data["date"] = self.date.isoformat(timespec="seconds") if self.date else None
        return data


CARD_FIELDS = ("steps", "tokens_seen", "wall_seconds", "best_val_loss", "best_val_bpb")
CARD_FIELDS += ("tokens_per_s", "mfu", "params")


def describe_run(run_dir: Path, name: str | None = None) -> RunRow:
    """The row of one run from its config.json and run_card.json."""
    row = RunRow(path=run_dir, name=name or str(run_dir))
    try:
        info = read_json(run_dir / CONFIG_FILE)
    except TformerError as e:
        row.error = str(e)
        return row
    row.kind, row.base = run_kind(info, run_dir), _base(info)
    try:
        row.params = ModelConfig.from_dict(info["model"]).num_params()
    except Exception:  # noqa: BLE001 - a damaged model section leaves the count blank
        row.params = None
    row.date = _modified(run_dir / CONFIG_FILE)
    if row.kind in ("imported", "model"):
        return row  # no training, so no card
    try:
        card = read_json(run_dir / RUN_CARD_FILE)
    except TformerError as e:
        row.error = str(e)
        return row
    for key in CARD_FIELDS:
        value = card.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(row, key, value)
    row.date = _modified(run_dir / RUN_CARD_FILE)
    return row


def _base(info: dict[str, Any]) -> str | None:
    """What a run was made from: a fine-tune's base run, an import's source directory."""
    source = info.get("base") or info.get("imported_from")
    return display_path(Path(source)) if isinstance(source, str) else None


def display_path(path: Path) -> str:
    """The path relative to the current folder when it lies inside it, else as it is."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _modified(path: Path) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromtimestamp(path.stat().st_mtime).astimezone()
    except OSError:
        return None


SORT_KEYS = {
    "name": "name",
    "kind": "kind",
    "params": "params",
    "tokens": "tokens_seen",
    "time": "wall_seconds",
    "loss": "best_val_loss",
    "bpb": "best_val_bpb",
    "speed": "tokens_per_s",
    "mfu": "mfu",
    "date": "date",
}


def sort_rows(rows: list[RunRow], key: str) -> list[RunRow]:
    """The rows sorted by a SORT_KEYS key, ascending, rows without that figure last."""
    if key not in SORT_KEYS:
        raise TformerError(f"--sort {key!r}: choose one of {', '.join(SORT_KEYS)}")
    attr = SORT_KEYS[key]
    present = [r for r in rows if getattr(r, attr) is not None]
    missing = [r for r in rows if getattr(r, attr) is None]
    return sorted(present, key=lambda r: getattr(r, attr)) + missing


# -- loss curves --------------------------------------------------------------------------------


@dataclass
class LossSeries:
    """A run's loss curves: (x, y) points of the training loss and of the validation loss.

    x is tokens seen or seconds of training; y is nats per token or bits per byte. time_estimated
    says the run's metrics carry no times (runs from before "elapsed" was logged): x is then each
    step's share of the run card's wall time.
    """

    run: Path
    name: str
    x: str
    y: str
    train: list[tuple[float, float]]
    val: list[tuple[float, float]]
    time_estimated: bool = False


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a torn last line (a crash mid-write) is left out."""
    path = run_dir / METRICS_FILE
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except FileNotFoundError:
        raise TformerError(f"{run_dir}: no {METRICS_FILE} (it was not trained here)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TformerError(f"{path}: unreadable ({e})") from None
    records = []
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            if n == len(lines):
                break
            raise TformerError(f"{path}:{n}: not a metrics record") from None
        records.append(record)
    return records


def loss_series(run_dir: Path, x: str = "tokens", y: str = "loss", name: str = "") -> LossSeries:
    """The training and validation loss of a run from its metrics.jsonl, against tokens seen
    (step x batch size x sequence length) or seconds of training ("elapsed"), in nats per token
    or bits per byte (the loss over the bytes per token its evals measured)."""
    if x not in X_AXES or y not in Y_AXES:
        raise TformerError(f"choose x from {X_AXES} and y from {Y_AXES}, got {x!r}, {y!r}")
    records = read_metrics(run_dir)
    info = read_json(run_dir / CONFIG_FILE)
    card = _card_or_empty(run_dir)
    to_x, estimated = _x_of(x, records, info, card, run_dir)
    scale = 1.0
    if y == "bpb":
        scale = _bits_per_byte_scale(records, run_dir)
    train = [(to_x(r), r["loss"] * scale) for r in records if _number(r.get("loss"))]
    val = [(to_x(r), r["val_loss"] * scale) for r in records if _number(r.get("val_loss"))]
    return LossSeries(run_dir, name or display_path(run_dir), x, y, train, val, estimated)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _card_or_empty(run_dir: Path) -> dict[str, Any]:
    try:
        return read_json(run_dir / RUN_CARD_FILE)
    except TformerError:
        return {}


def _x_of(x: str, records: list[dict], info: dict, card: dict, run_dir: Path):
    """(record -> x value, whether times are estimated)."""
    if x == "tokens":
        per_step = tokens_per_step(info, card)
        return (lambda r: float(r["step"] * per_step)), False
    if all(_number(r.get("elapsed")) for r in records):
        return (lambda r: float(r["elapsed"])), False
    last, wall = max((r["step"] for r in records), default=0), card.get("wall_seconds")
    if not (_number(wall) and last):
        raise TformerError(f"{run_dir}: its metrics hold no times and it has no run card")
    return (lambda r: r["step"] / last * wall), True


def tokens_per_step(info: dict[str, Any], card: dict[str, Any]) -> int:
    """Tokens a step of this run trains on: batch size x sequence length (the run card's, else
    what its training settings imply)."""
    train = info.get("train") if isinstance(info.get("train"), dict) else {}
    batch = card.get("batch_size") or train.get("batch_size") or 1
    return batch * trained_seq_len(info, card)


def trained_seq_len(info: dict[str, Any], card: dict[str, Any] | None = None) -> int:
    """The sequence length a run trained at: its card's; else its --seq-len; else what training
    picks by default (pretraining: the context up to 256, as TrainConfig.context; fine-tuning:
    the context); for a model that was not trained here, its context."""
    if card and isinstance(card.get("seq_len"), int):
        return card["seq_len"]
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    context = int(model.get("max_seq_len", 256))
    train = info.get("train") if isinstance(info.get("train"), dict) else None
    if train is None:
        return context
    if train.get("seq_len"):
        return int(train["seq_len"])
    return context if info.get("finetune") else min(context, 256)


def _bits_per_byte_scale(records: list[dict], run_dir: Path) -> float:
    """Bits per byte per nat per token: 1 / (ln 2 x bytes per token), from an eval record."""
    for r in records:
        if _number(r.get("val_loss")) and _number(r.get("val_bpb")) and r["val_loss"] > 0:
            return r["val_bpb"] / r["val_loss"]
    raise TformerError(
        f"{run_dir}: no bits per byte in its metrics (fine-tuning measures answer tokens only)"
    )


def seq_len_of(run_dir: Path, context: int) -> int:
    """The sequence length a run (or its best/) trained at; context, the model's window, for a
    model not trained by tformer (an import, a Hugging Face directory)."""
    info = read_dir_config(run_dir) or {}
    if "train" not in info:
        return context
    card = _card_or_empty(run_dir)
    if not card and run_dir.name == BEST_DIR:  # best/ is the run's, whose card is beside it
        card = _card_or_empty(run_dir.parent)
    return min(trained_seq_len(info, card), context)
