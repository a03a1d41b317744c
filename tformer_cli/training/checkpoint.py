"""Saving a run as it trains (the latest weights, what resume needs, the best weights) and
reading it back for --resume.

Every process takes part in gathering the state (FSDP shards it); rank 0 writes.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from models.weights import untied_state
from tformer_cli import __version__
from tformer_cli.runs.rundir import BEST_DIR, METRICS_FILE, TOKENIZER_FILE, TRAIN_STATE_DIR
from tformer_cli.training.context import LoopSpec, RunContext
from tformer_cli.training.metrics import trim_metrics
from tformer_cli.training.state import RunState, load_train_state, save_train_state

if TYPE_CHECKING:
    from tformer_cli.training.trainable import Trainable

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(
    ctx: RunContext, spec: LoopSpec, t: Trainable, state: RunState, best: bool = False
) -> None:
    """Save the latest weights into the run directory and what resume needs into train_state/;
    best=True: the weights alone (and the tokenizer) into best/, after an eval that improved."""
    weights = untied_state(get_model_state_dict(t.raw, options=_FULL), spec.model_cfg)
    info = {"tformer_version": __version__, "train": ctx.cfg.to_dict(), **spec.info}
    run_dir = ctx.run_dir
    if best:
        if ctx.dist.is_main:
            extra = {**info, "step": state.step, "val_loss": state.best_val_loss}
            spec.save_weights(weights, run_dir / BEST_DIR, extra)
            shutil.copyfile(run_dir / TOKENIZER_FILE, run_dir / BEST_DIR / TOKENIZER_FILE)
        return
    optim = get_optimizer_state_dict(t.raw, t.optimizer, options=_FULL)
    if ctx.dist.is_main:
        spec.save_weights(weights, run_dir, {**info, "step": state.step})
        run = {"run": state.to_json()}
        save_train_state(run_dir / TRAIN_STATE_DIR, state.step, weights, optim, run)
        ctx.on_event("saved", {"step": state.step, "path": str(run_dir)})
    state.last_saved_step = state.step
    ctx.dist.barrier()


def load_checkpoint(
    ctx: RunContext, raw: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[RunState, dict[str, torch.Tensor]]:
    """Restore the weights and optimizer of train_state/; returns the run state and the saved
    random state (restored by the caller last, so nothing after this shifts it)."""
    saved = load_train_state(ctx.run_dir / TRAIN_STATE_DIR)
    set_model_state_dict(raw, saved.model, options=StateDictOptions(strict=False))
    set_optimizer_state_dict(raw, optimizer, saved.optimizer, options=_FULL)
    state = RunState.from_json(saved.info["run"])
    state.step = saved.step
    if ctx.dist.is_main:
        trim_metrics(ctx.run_dir / METRICS_FILE, state.step, ctx.on_event)
    ctx.on_event("resumed", {"step": state.step})
    return state, saved.rng
