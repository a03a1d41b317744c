"""RUN_DIR/metrics.jsonl: one JSON object per logged step or eval, appended as training goes.

A resumed run first forgets what was logged after its checkpoint (trim_metrics), so the file
reads as one run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models.weights import atomic_write_text
from tformer_cli.errors import TformerError
from tformer_cli.training.distributed import DistInfo


class MetricsLog:
    """The metrics file (rank 0 writes it; path None elsewhere) and the running sums between
    two logged steps: their mean loss and token rate make the next step record.

    With a clock, every record gets "elapsed": the seconds of training so far, those of the
    sessions before a resume (offset) included, so loss curves can be drawn against wall time.
    """

    def __init__(
        self,
        path: Path | None,
        since: float,
        clock: Callable[[], float] | None = None,
        offset: float = 0.0,
    ):
        self.file = open(path, "a", encoding="utf-8") if path is not None else None
        self.since = since  # when the current interval began
        self.tokens, self.loss_sum, self.count = 0, 0.0, 0
        self.clock, self.started, self.offset = clock, since, offset

    def add(self, loss: float, tokens: int) -> None:
        """Count one step into the current interval."""
        self.tokens += tokens
        self.loss_sum, self.count = self.loss_sum + loss, self.count + 1

    def step_record(
        self,
        step: int,
        lr: float,
        grad_norm: torch.Tensor,
        now: float,
        dist: DistInfo,
        device: torch.device,
    ) -> dict[str, Any]:
        """Write and return the record of the interval that ends at step, and start the next."""
        rate = self.tokens / max(now - self.since, 1e-9)
        record = {
            "step": step,
            "loss": dist.mean(self.loss_sum / self.count, device),
            "lr": lr,
            "tokens_per_s": rate * dist.world_size,
            "grad_norm": float(grad_norm),
        }
        self.write(record)
        self.since, self.tokens, self.loss_sum, self.count = now, 0, 0.0, 0
        return record

    def write(self, record: dict[str, Any]) -> None:
        """Append one record, flushed, so a crash loses at most the line being written."""
        if self.file:
            if self.clock is not None:
                record = {**record, "elapsed": self.offset + self.clock() - self.started}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        """Close the file (the records are flushed already)."""
        if self.file:
            self.file.close()


def trim_metrics(path: Path, last_step: int, on_event: Callable[[str, dict], None]) -> None:
    """On resume, forget metrics logged after the checkpoint, so the file reads as one run.

    A torn last line (what a crash mid-write leaves) is dropped with a notice; a damaged line
    elsewhere means the file was edited, and is refused naming the line.
    """
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    kept = []
    for n, line in enumerate(lines, start=1):
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            if n == len(lines):
                message = f"{path}: dropped a torn last line (line {n}), as a crash leaves it"
                on_event("notice", {"message": message})
                break
            raise TformerError(
                f"{path}:{n}: not a metrics record; remove that line (or the file) to resume"
            ) from None
        if step <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
