"""The run card: what a training run did, as a dict (shown by commands/runcard.py and saved as
RUN_DIR/run_card.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from models.flops import flops_per_token
from tformer_cli import __version__
from tformer_cli.profiling.memory import peak_memory_bytes
from tformer_cli.runs.rundir import BEST_DIR, RUN_CARD_FILE
from tformer_cli.training.context import LoopSpec, RunContext
from tformer_cli.training.evaluation import bits_per_byte
from tformer_cli.training.state import RunState

SPARK_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """The values as a line of bar characters, at most width of them (evenly picked)."""
    if not values:
        return ""
    if len(values) > width:
        chunk = len(values) / width
        values = [values[int(i * chunk)] for i in range(width)]
    lo, hi = min(values), max(values)
    top = len(SPARK_BARS) - 1
    return "".join(SPARK_BARS[int((v - lo) / (hi - lo + 1e-12) * top)] for v in values)


def build_run_card(
    ctx: RunContext,
    spec: LoopSpec,
    state: RunState,
    *,
    trainable_params: int,
    steps_run: int,
    last_eval: dict[str, Any] | None,
    interrupted: bool,
    matmul_peak: float,
) -> dict[str, Any]:
    """The card of a finished (or interrupted) loop; steps_run counts this command's steps."""
    cfg, run_dir, world = ctx.cfg, ctx.run_dir, ctx.dist.world_size
    wall = state.train_seconds
    tokens_per_s = steps_run * cfg.batch_size * spec.seq_len / max(wall, 1e-9)
    flops_tok = flops_per_token(spec.model_cfg, spec.seq_len)
    best = None if math.isinf(state.best_val_loss) else state.best_val_loss
    return {
        "run_dir": str(run_dir),
        "tformer_version": __version__,
        "preset": spec.label or (cfg.auto["rung"] if cfg.auto else cfg.preset),
        "auto": cfg.auto,  # what --preset auto chose and why, or None
        "params": spec.model_cfg.num_params(),
        "trainable_params": trainable_params,
        "model": spec.model_cfg.to_dict(),
        "seq_len": spec.seq_len,
        "batch_size": cfg.batch_size,
        "device": str(ctx.device),
        "precision": ctx.precision,
        "attention": state.attention,
        "world_size": world,
        "steps": state.step,
        "total_steps": state.total_steps,
        "tokens_seen": state.tokens_seen,
        "best_val_loss": best,
        "best_val_bpb": None if best is None else bits_per_byte(best, spec.bytes_per_token),
        "best_step": state.best_step,
        "final_val_loss": last_eval["val_loss"] if last_eval else None,
        "final_val_bpb": last_eval["val_bpb"] if last_eval else None,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_tok,
        "matmul_peak_flops": matmul_peak,
        "mfu": tokens_per_s * flops_tok / (matmul_peak * world) if matmul_peak else None,
        "peak_memory_bytes": peak_memory_bytes(ctx.device),
        "wall_seconds": wall,
        "loss_sparkline": sparkline(state.losses),
        "interrupted": interrupted,
        "saved": {"latest": str(run_dir), "best": str(run_dir / BEST_DIR)},
    }


def write_run_card(run_dir: Path, card: dict[str, Any]) -> None:
    """RUN_DIR/run_card.json: the card as `--json` prints it."""
    (run_dir / RUN_CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
