"""Validation: the mean loss over fixed windows, in bits per byte where that means something,
and the best weights kept in best/."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from tformer_cli.data.batches import BatchSampler
from tformer_cli.training.checkpoint import save_checkpoint
from tformer_cli.training.context import LoopSpec, RunContext
from tformer_cli.training.distributed import DistInfo
from tformer_cli.training.loss import lm_loss
from tformer_cli.training.metrics import MetricsLog
from tformer_cli.training.state import RunState

if TYPE_CHECKING:
    from tformer_cli.training.trainable import Trainable


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    sampler: BatchSampler,
    batches: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], Any],
    dist: DistInfo,
) -> float:
    """Mean loss over fixed validation windows (the same ones at every eval)."""
    model.eval()
    per_rank = max(1, batch_size // dist.world_size)
    total = 0.0
    for i in range(batches):
        rows = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
        x, y = sampler.batch(i, per_rank * dist.world_size, rows)
        with autocast():
            total += lm_loss(model, x.to(device), y.to(device)).item()
    model.train()
    return dist.mean(total / batches, device)


def bits_per_byte(loss: float, bytes_per_token: float | None) -> float | None:
    """A loss in nats per token as bits per byte of text; None without a bytes-per-token figure
    (fine-tuning evaluates answer tokens only, which have no bytes-of-text measure)."""
    return loss / math.log(2) / bytes_per_token if bytes_per_token else None


def run_eval(
    ctx: RunContext,
    spec: LoopSpec,
    t: Trainable,
    state: RunState,
    metrics: MetricsLog,
    micro: int,
) -> dict[str, Any]:
    """Evaluate, log and report the record; a loss lower than any before is saved to best/."""
    clock = ctx.budget.clock
    started = clock()
    batch_size = micro * ctx.dist.world_size
    val_loss = evaluate(
        t.model,
        spec.val_batches,
        ctx.cfg.eval_batches,
        batch_size,
        ctx.device,
        t.autocast,
        ctx.dist,
    )
    record = {
        "step": state.step,
        "val_loss": val_loss,
        "val_bpb": bits_per_byte(val_loss, spec.bytes_per_token),
        "eval_seconds": clock() - started,
    }
    metrics.write(record)
    ctx.on_event("eval", record)
    if val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step = val_loss, state.step
        save_checkpoint(ctx, spec, t, state, best=True)
    return record
