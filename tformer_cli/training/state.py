"""What --resume needs, in RUN_DIR/train_state/: weights, optimizer, RNG, step and RunState.

Tensors go in safetensors, the rest in JSON. The tensor files carry the step in their names and
state.json, written last and atomically, names the set that belongs together; older sets are
removed only after that. A crash at any moment therefore leaves state.json pointing at a
complete checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.weights import atomic_write_text, load_tensors, save_tensors
from tformer_cli.errors import TformerError, parse_json
from tformer_cli.runs.rundir import TRAIN_STATE_DIR, TRAIN_STATE_FILE


@dataclass
class RunState:
    """What changes as training goes; all of it goes into train_state/state.json."""

    step: int = 0
    total_steps: int = 0
    warmup: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_val_loss: float = math.inf
    best_step: int = -1
    last_saved_step: int = -1
    losses: list[float] = field(default_factory=list)  # one per log interval, for the sparkline
    attention: str = ""  # the attention implementation trained with; "" until chosen

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values (no best loss yet is null: JSON has no infinity)."""
        data = dict(self.__dict__)
        data["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        """The state to_json wrote; fields it does not know are ignored."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known.setdefault("attention", "sdpa")  # what every run trained with before it was recorded
        if known.get("best_val_loss") is None:
            known["best_val_loss"] = math.inf
        return cls(**known)


@dataclass
class TrainState:
    """A resumable checkpoint as read back from disk."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    info: dict[str, Any]


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    # Keys are parameter names (they contain dots), so the entry name is what follows the last dot.
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            param, name = key[len("optim.") :].rsplit(".", 1)
            state.setdefault(param, {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        param, name = key.rsplit(".", 1)
        state.setdefault(param, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    """The CPU and CUDA random generators' states, as tensors to save."""
    state = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"rng.cuda.{i}"] = s
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    """Put back what rng_state saved (CUDA's only where this machine has CUDA)."""
    torch.set_rng_state(state["rng.cpu"])
    cuda = [state[k] for k in sorted(state) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_train_state(
    directory: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    info: dict[str, Any],
) -> None:
    """Write one resumable checkpoint atomically and drop the older ones."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, optim = f"model-{step:08d}.safetensors", f"optimizer-{step:08d}.safetensors"
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    save_tensors(model_state, directory / weights)
    save_tensors({**opt_tensors, **rng_state()}, directory / optim)
    state = {"step": step, "model": weights, "optimizer": optim, "optimizer_meta": opt_meta, **info}
    atomic_write_text(directory / TRAIN_STATE_FILE, json.dumps(state, indent=1) + "\n")
    for old in directory.glob("*.safetensors"):
        if old.name not in (weights, optim):
            old.unlink(missing_ok=True)


def load_train_state(directory: str | Path) -> TrainState:
    """Read the checkpoint that state.json names, or say why --resume cannot."""
    directory = Path(directory)
    path = directory / TRAIN_STATE_FILE
    if not path.is_file():
        raise TformerError(
            f"{directory.parent}: nothing to resume (no {TRAIN_STATE_DIR}/{TRAIN_STATE_FILE}); "
            "start a new run without --resume"
        )
    state = parse_json(path.read_text(encoding="utf-8"), path)
    model = load_tensors(directory / state["model"])
    optim = load_tensors(directory / state["optimizer"])
    rng = {k: v for k, v in optim.items() if k.startswith("rng.")}
    optimizer = _unflatten_optimizer(optim, state.pop("optimizer_meta"))
    step = state.pop("step")
    for key in ("model", "optimizer"):
        state.pop(key)
    return TrainState(step=step, model=model, optimizer=optimizer, rng=rng, info=state)
