"""What a training run is made of, shared by both recipes and every piece of the loop.

LoopSpec says what is trained and how it is saved (pretraining and fine-tuning differ only
there); RunContext says where and how the run goes: settings, device, processes, run directory,
how it reports and when it stops. open_run sets a context up and tears it down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import ModelConfig, Transformer
from models.weights import atomic_write_bytes
from tformer_cli.data.tokenizer import Tokenizer
from tformer_cli.device import resolve_device, resolve_precision
from tformer_cli.runs.rundir import TOKENIZER_FILE
from tformer_cli.runs.target import RunTarget, check_run_dir_use, clear_run_dir
from tformer_cli.training.budget import TimeBudget
from tformer_cli.training.config import TrainConfig
from tformer_cli.training.distributed import DistInfo, init_distributed, shutdown_distributed

Event = Callable[[str, dict[str, Any]], None]
Sampler = Callable[[Transformer, Tokenizer], str]


def no_events(kind: str, data: dict[str, Any]) -> None:
    """Report nothing: the default, and what every process but rank 0 reports to."""


@dataclass
class LoopSpec:
    """What the loop trains and how it saves: pretraining and fine-tuning differ only here."""

    model_cfg: ModelConfig
    build_model: Callable[[], torch.nn.Module]  # called after seeding; trainable params need grad
    train_batches: Any  # .batch(step, batch_size, rows) -> (x, y), y = IGNORE where no loss
    val_batches: Any
    seq_len: int
    # The inference files: (weights, directory, extra config.json fields) -> None
    save_weights: Callable[[dict[str, torch.Tensor], Path, dict[str, Any]], None]
    info: dict[str, Any]  # extra config.json fields
    tokenizer: Tokenizer  # what samples are decoded with
    bytes_per_token: float | None = None  # for bits per byte; None where it means nothing
    label: str | None = None  # what the run card calls the model (default: the preset)


@dataclass
class RunContext:
    """Where and how a run goes; the same for every piece of the loop."""

    cfg: TrainConfig
    device: torch.device
    precision: str
    dist: DistInfo
    budget: TimeBudget
    resume: bool = False
    overwrite: bool = False
    on_event: Event = no_events
    stop: threading.Event = field(default_factory=threading.Event)  # set by Ctrl-C
    sampler: Sampler | None = None
    run_dir: Path | None = None  # set once chosen, on every rank
    target: RunTarget | None = None  # the locked run directory, on rank 0

    def claim(self, target: RunTarget) -> None:
        """Hold target's lock for the run (open_run lets go) and check it may be written."""
        self.target = target
        check_run_dir_use(target.path, self.resume, self.overwrite)

    def prepare_run_dir(self, tokenizer: Path) -> None:
        """Clear the directory for a new run and give it the tokenizer file; a resumed run's
        stays as it is.

        Called once every input is known good: only then may an --overwrite remove the run that
        was there. The tokenizer is read first, as clearing removes staged files.
        """
        if self.dist.is_main:
            data = None if self.resume else tokenizer.read_bytes()
            clear_run_dir(self.run_dir, self.resume)
            if data is not None:
                atomic_write_bytes(self.run_dir / TOKENIZER_FILE, data)
        self.dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        """True on every process when it is true on any (so all stop at the same step)."""
        return self.dist.any(flag, self.device)


@contextmanager
def open_run(
    cfg: TrainConfig,
    budget: TimeBudget,
    resume: bool,
    overwrite: bool,
    on_event: Event,
    stop: threading.Event | None,
    sampler: Sampler | None,
) -> Iterator[RunContext]:
    """The run's device, precision and processes; however it ends, the lock is let go and the
    process group left. A start that fails removes the run directory if it made it empty."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    dist, device = init_distributed(device)
    ctx = RunContext(
        cfg=cfg,
        device=device,
        precision=precision,
        dist=dist,
        budget=budget,
        resume=resume,
        overwrite=overwrite,
        on_event=on_event if dist.is_main else no_events,
        stop=stop or threading.Event(),
        sampler=sampler,
    )
    failed = True
    try:
        yield ctx
        failed = False
    finally:
        if ctx.target is not None:
            ctx.target.release(failed)
        shutdown_distributed(dist)
