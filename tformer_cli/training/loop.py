"""The training loop shared by pretraining and fine-tuning: for each step the learning rate,
forward and backward over the micro-batches, clip, step, then log, eval, sample and save.

The loop reports through `ctx.on_event(kind, data)` and never prints. It stops cleanly when
`ctx.stop` is set (Ctrl-C), saving a checkpoint that --resume continues bit for bit: a step's
batch depends only on (seed, step), and weights, optimizer and RNG are restored exactly.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from tformer_cli.device import matmul_peak_flops
from tformer_cli.errors import TformerError
from tformer_cli.runs.rundir import METRICS_FILE
from tformer_cli.training.budget import FIRST_FIT, UNTIL_FITTED
from tformer_cli.training.checkpoint import save_checkpoint
from tformer_cli.training.context import LoopSpec, RunContext
from tformer_cli.training.evaluation import run_eval
from tformer_cli.training.loss import lm_loss
from tformer_cli.training.metrics import MetricsLog
from tformer_cli.training.optim import default_warmup, lr_at
from tformer_cli.training.runcard import build_run_card, write_run_card
from tformer_cli.training.state import RunState, restore_rng
from tformer_cli.training.trainable import Trainable, build_trainable, micro_batch_size


class TrainingDiverged(TformerError):
    """The loss became NaN or infinite."""


def run_loop(ctx: RunContext, spec: LoopSpec) -> dict[str, Any]:
    """Train spec's model as ctx says; returns the run card (also saved as run_card.json)."""
    cfg, dist, budget = ctx.cfg, ctx.dist, ctx.budget
    micro = micro_batch_size(cfg, dist.world_size)
    t, state, rng = build_trainable(ctx, spec)
    min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10
    budget.settle()  # what setting up took is spent: the rest is the loop's
    plan_schedule(ctx, state)
    peak = matmul_peak_flops(ctx.device, ctx.precision) if dist.is_main else 0.0
    ctx.on_event("start", _start_event(ctx, spec, state))
    if rng is not None:
        restore_rng(rng)  # last, so nothing above shifts the dropout stream
    t.model.train()
    budget.start(cfg.eval_batches, sampling=ctx.sampler is not None)
    path = ctx.run_dir / METRICS_FILE if dist.is_main else None
    metrics = MetricsLog(path, budget.started, budget.clock, state.train_seconds)
    start_step, last_eval, interrupted = state.step, None, False
    tokens_per_step = cfg.batch_size * spec.seq_len
    sample_every = cfg.eval_every if cfg.sample_every is None else cfg.sample_every
    try:
        while state.step < state.total_steps:
            if ctx.any_rank(ctx.stop.is_set()):
                interrupted = True
                break
            if budget.out_of_time(last_eval, ctx.any_rank):
                break
            with budget.timing_step():
                lr = lr_at(state.step, cfg.lr, min_lr, state.warmup, state.total_steps)
                loss, grad_norm = train_step(ctx, spec, t, state, micro, lr)
                state.step += 1
                state.tokens_seen += tokens_per_step
            metrics.add(loss, tokens_per_step)
            refit_schedule(ctx, state, ran=state.step - start_step)
            log_step(ctx, state, metrics, lr, loss, grad_norm)
            if _due(state, cfg.eval_every):
                with budget.timing_eval():
                    last_eval = run_eval(ctx, spec, t, state, metrics, micro)
            if _due(state, sample_every):
                sample(ctx, spec, t, state)
            if _due(state, cfg.save_every):
                save_checkpoint(ctx, spec, t, state)
    except KeyboardInterrupt:
        interrupted = True  # a second Ctrl-C arriving mid-step: the last completed step is saved
    finally:
        state.train_seconds += budget.elapsed()

    if not interrupted and (last_eval is None or last_eval["step"] != state.step):
        last_eval = run_eval(ctx, spec, t, state, metrics, micro)
    if not interrupted:
        sample(ctx, spec, t, state)
    if state.step != state.last_saved_step:
        save_checkpoint(ctx, spec, t, state)
    metrics.close()
    card = build_run_card(
        ctx,
        spec,
        state,
        trainable_params=sum(p.numel() for p in t.raw.parameters() if p.requires_grad),
        steps_run=state.step - start_step,
        last_eval=last_eval,
        interrupted=interrupted,
        matmul_peak=peak,
    )
    if dist.is_main:
        write_run_card(ctx.run_dir, card)
    return card


def train_step(
    ctx: RunContext, spec: LoopSpec, t: Trainable, state: RunState, micro: int, lr: float
) -> tuple[float, torch.Tensor]:
    """One optimizer step over --grad-accum micro-batches; returns (mean loss, gradient norm)."""
    cfg, device = ctx.cfg, ctx.device
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=device)
    for a in range(cfg.grad_accum):
        first = (ctx.dist.rank * cfg.grad_accum + a) * micro  # this process's rows of the batch
        x, y = spec.train_batches.batch(state.step, cfg.batch_size, slice(first, first + micro))
        # DDP averages the gradients over processes on backward: once per step is enough.
        last = a == cfg.grad_accum - 1 or not isinstance(t.model, DistributedDataParallel)
        with contextlib.nullcontext() if last else t.model.no_sync(), t.autocast():
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = lm_loss(t.model, x, y)
        t.scaler.scale(loss / cfg.grad_accum).backward()
        step_loss += loss.detach()
    t.scaler.unscale_(t.optimizer)
    # --grad-clip 0 turns clipping off; the norm is still measured for the log
    grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), cfg.grad_clip or math.inf)
    loss_value = step_loss.item() / cfg.grad_accum
    if not t.scaler.is_enabled():  # fp16's scaler skips the steps whose gradients overflow
        check_finite(loss_value, float(grad_norm), state)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm


def check_finite(loss: float, grad_norm: float, state: RunState) -> None:
    """Raise TrainingDiverged naming what became NaN or infinite (the loss or the gradients)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    kept = (
        f"the last good checkpoint (step {state.last_saved_step}) is kept"
        if state.last_saved_step >= 0
        else "nothing was saved"
    )
    what = (
        f"the loss became {loss}"
        if not math.isfinite(loss)
        else f"the gradient norm became {grad_norm} (loss {loss:.4f})"
    )
    raise TrainingDiverged(
        f"{what} at step {state.step + 1}; {kept}; try a lower --lr (or --precision fp32)"
    )


def plan_schedule(ctx: RunContext, state: RunState) -> None:
    """The step count and warmup: --max-steps, else 1000, or under --time until fitted.

    A resumed run keeps its schedule unless --max-steps changes its length.
    """
    cfg = ctx.cfg
    if not ctx.resume:
        state.total_steps = cfg.max_steps or (UNTIL_FITTED if ctx.budget.limited else 1000)
        state.warmup = cfg.warmup if cfg.warmup is not None else default_warmup(state.total_steps)
    elif cfg.max_steps:
        state.total_steps = cfg.max_steps


def refit_schedule(ctx: RunContext, state: RunState, ran: int) -> None:
    """Under --time without --max-steps, end the schedule where the time runs out."""
    cfg = ctx.cfg
    if cfg.max_steps is not None:
        return
    total = ctx.budget.fit(state.step, ran, cfg.log_every)
    if total is None:
        return
    state.total_steps = total
    if ran == FIRST_FIT and cfg.warmup is None:  # the first fit sets the warmup too
        state.warmup = default_warmup(total)
    ctx.on_event("schedule", {"total_steps": total})


def log_step(
    ctx: RunContext,
    state: RunState,
    metrics: MetricsLog,
    lr: float,
    loss: float,
    grad_norm: torch.Tensor,
) -> None:
    """Every --log-every steps (and the last) a metrics record and a "step" event; else a tick."""
    if state.step % ctx.cfg.log_every and state.step != state.total_steps:
        ctx.on_event("tick", {"step": state.step, "total_steps": state.total_steps, "loss": loss})
        return
    now = ctx.budget.clock()
    record = metrics.step_record(state.step, lr, grad_norm, now, ctx.dist, ctx.device)
    state.losses.append(record["loss"])
    elapsed = now - ctx.budget.started
    ctx.on_event("step", {**record, "total_steps": state.total_steps, "elapsed": elapsed})


def sample(ctx: RunContext, spec: LoopSpec, t: Trainable, state: RunState) -> None:
    """Show what the model writes now (rank 0), leaving the training RNG as it was."""
    if ctx.sampler is None or not ctx.dist.is_main:
        return
    rng = torch.get_rng_state()  # sampling must not shift the training RNG (exact resume)
    with ctx.budget.timing_sample():
        try:
            t.raw.eval()
            text = ctx.sampler(t.raw, spec.tokenizer)
            ctx.on_event("sample", {"step": state.step, "text": text})
        finally:
            t.raw.train()
            torch.set_rng_state(rng)


def _due(state: RunState, every: int | None) -> bool:
    """Whether an every-N-steps action falls on this step (the last step has its own)."""
    return bool(every) and state.step % every == 0 and state.step < state.total_steps


def _start_event(ctx: RunContext, spec: LoopSpec, state: RunState) -> dict[str, Any]:
    return {
        "params": spec.model_cfg.num_params(),
        "config": spec.model_cfg.to_dict(),
        "seq_len": spec.seq_len,
        "device": str(ctx.device),
        "precision": ctx.precision,
        "total_steps": state.total_steps,
        "start_step": state.step,
        "world_size": ctx.dist.world_size,
        "budget": ctx.budget.left,
    }
