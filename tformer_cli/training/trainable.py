"""What a training step works on: the model, its optimizer and the precision it runs in."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from models import ModelConfig
from models.attention import training_attention
from models.fused import release_weight_copies
from tformer_cli.device import DTYPES
from tformer_cli.errors import TformerError
from tformer_cli.profiling.fit import require_fit
from tformer_cli.training.checkpoint import load_checkpoint
from tformer_cli.training.config import TrainConfig
from tformer_cli.training.context import LoopSpec, RunContext
from tformer_cli.training.distributed import DistInfo
from tformer_cli.training.optim import build_optimizer
from tformer_cli.training.state import RunState


@dataclass
class Trainable:
    """The model as built (raw: saved and sampled from) and as trained (model: wrapped for DDP
    and torch.compile), its optimizer, the fp16 gradient scaler and the autocast context."""

    raw: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable[[], AbstractContextManager[Any]]


def micro_batch_size(cfg: TrainConfig, world_size: int) -> int:
    """Sequences per forward pass: the batch split over the processes and --grad-accum."""
    if cfg.batch_size % (world_size * cfg.grad_accum):
        raise TformerError(
            f"--batch-size {cfg.batch_size} must be divisible by processes x --grad-accum "
            f"({world_size} x {cfg.grad_accum})"
        )
    return cfg.batch_size // (world_size * cfg.grad_accum)


def check_batch_fits(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    seq_len: int,
    precision: str,
    device: torch.device,
    dist: DistInfo,
) -> None:
    """Refuse a batch the memory model says cannot fit, before a byte of it is allocated."""
    micro = max(1, cfg.batch_size // (dist.world_size * cfg.grad_accum))
    flag = f"--batch-size {cfg.batch_size}" + (
        f" (x{cfg.grad_accum} accumulation)" if cfg.grad_accum > 1 else ""
    )
    require_fit("train", model_cfg, seq_len, micro, precision, device, flag)


def build_trainable(
    ctx: RunContext, spec: LoopSpec
) -> tuple[Trainable, RunState, dict[str, torch.Tensor] | None]:
    """The seeded model and its optimizer, restored from train_state/ on --resume.

    Returns (trainable, state, rng): rng is the saved random state to restore just before the
    first step (None for a new run), so nothing in between shifts the dropout stream.
    """
    cfg, device = ctx.cfg, ctx.device
    torch.manual_seed(cfg.seed)
    raw = spec.build_model().to(device)
    if cfg.fsdp and ctx.dist.enabled:
        from torch.distributed.fsdp import fully_shard

        for block in raw.layers:  # shard before the optimizer sees the parameters
            fully_shard(block)
        fully_shard(raw)
    optimizer = build_optimizer(raw, cfg.lr, cfg.weight_decay, device)
    # The bf16 copies of the weights (models/fused.py) are made again after every update.
    optimizer.register_step_post_hook(lambda *_: release_weight_copies(raw))
    state, rng = load_checkpoint(ctx, raw, optimizer) if ctx.resume else (RunState(), None)
    choose_attention(raw, state, device, spec.model_cfg)
    model: torch.nn.Module = raw
    if ctx.dist.enabled and not cfg.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        model = torch.compile(model)
    scaler = torch.amp.GradScaler(device.type, enabled=ctx.precision == "fp16")
    return Trainable(raw, model, optimizer, scaler, _autocast(device, ctx.precision)), state, rng


def choose_attention(
    raw: torch.nn.Module, state: RunState, device: torch.device, model_cfg: ModelConfig
) -> None:
    """Train with the attention the run recorded, or (a new run) with the one the measured rule
    picks (models.attention.training_attention), and record it. Every rank and every --resume
    then draws the same dropout masks the same way."""
    if not state.attention:
        state.attention = training_attention(device.type, model_cfg.dropout)
    if hasattr(raw, "set_attention"):
        raw.set_attention(state.attention)


def _autocast(device: torch.device, precision: str) -> Callable[[], AbstractContextManager[Any]]:
    """A fresh autocast context for each use; fp32 runs without one."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = DTYPES[precision]
    return lambda: torch.autocast(device.type, dtype=dtype)
