"""`--preset auto`: the model, batch and learning rate that a --time budget buys on this device.

`tformer train corpus.txt --time 90s` without a preset or [model] table trains the shape that
reaches a low validation loss in that time, not the fixed default (`micro`, 6 layers, batch 16).
Measured at 90 s on tinyshakespeare (2-core AVX512-BF16 CPU, bf16, bits per byte): `micro` 2.57
(2.57 at lr 3e-3), `micro` at batch 8 2.37, a wider 4-layer model (dim 192) at batch 16 2.54;
dim 128 x 4 layers 2.27 at batch 8 and 2.23 at batch 4; the `nano` shape (dim 96 x 4 layers) at
lr 3e-3 2.35, 2.34, 2.22 and 2.19 at batch 16, 8, 4 and 2. Short budgets want a small, shallow
model and many optimizer steps; longer ones can afford more parameters. So:

- the budget buys about T = seconds x the measured matmul peak at the run's precision (the
  0.3 s measurement the run card's MFU uses) x EFFICIENCY (the MFU these shapes reached) /
  model FLOPs per token (models.flops) training tokens for each rung of the ladder;
- the rung is the largest whose T per parameter is at least MIN_TOKENS_PER_PARAM (the winner at
  90 s saw about 2, the 4-layer dim 128 model close behind about 1, the larger ones that lost
  0.3-0.6), and the smallest when none is; each rung brings the batch and lr it trained best
  with (batch 4 rather than 2 for the small ones: 2 was 1% better at 90 s on this CPU, but uses
  a larger device poorly);
- when that many tokens read the training split more than DROPOUT_EPOCHS times, dropout.

The choice and why are recorded in config.json ("train" -> "auto") and shown on the run card;
`--resume` takes the recorded choice rather than measuring again. Flags the user gives (--lr,
--batch-size) win over the rung's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models import ModelConfig, get_preset
from models.flops import flops_per_token
from tformer_cli.runs.rundir import read_dir_config
from tformer_cli.units import human_count

AUTO = "auto"
BASE_PRESET = "micro"  # the rungs' other fields (context 256, RMSNorm, SwiGLU, RoPE)
EFFICIENCY = 0.2  # model FLOPs / measured matmul peak of a training step of these shapes
MIN_TOKENS_PER_PARAM = 2.0  # below this a smaller model, trained on more tokens, did better
# A budget that reads the training split more often than this trains with DROPOUT: at 10 min on
# tinyshakespeare (19 epochs) the rung overfit after 7, best 2.14 bits per byte, ending at 2.43;
# with dropout 0.1 it reached 2.08 and still improved at the end. 90 s (4 epochs) needs none.
DROPOUT_EPOCHS = 6.0
DROPOUT = 0.1
SEQ_LEN = 256


@dataclass(frozen=True)
class Rung:
    """One shape of the ladder and the learning rate and batch it trains best with."""

    name: str
    model: dict[str, Any]
    lr: float
    batch_size: int


LADDER = (  # smallest first: four layers while budgets are short, as deeper ones learned slower
    Rung("auto-xs", dict(dim=96, n_layers=4, n_heads=4, hidden_dim=256), 3e-3, 4),
    Rung("auto-s", dict(dim=128, n_layers=4, n_heads=4, hidden_dim=352), 3e-3, 4),
    Rung("auto-m", dict(dim=192, n_layers=4, n_heads=6, hidden_dim=512), 2e-3, 8),
    Rung("auto-l", dict(dim=256, n_layers=6, n_heads=8, hidden_dim=672), 1e-3, 16),
    Rung("auto-xl", dict(dim=384, n_layers=6, n_heads=6, hidden_dim=1024), 1e-3, 16),
)


@dataclass(frozen=True)
class AutoChoice:
    """What --preset auto chose, and why (recorded in config.json and shown on the run card)."""

    rung: str
    model: dict[str, Any]
    lr: float
    batch_size: int
    budget_s: float
    peak_flops: float
    why: str
    dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rung_config(rung: Rung, vocab_size: int) -> ModelConfig:
    """A rung's model at this vocabulary."""
    return get_preset(BASE_PRESET, **rung.model, vocab_size=vocab_size)


def budget_tokens(rung: Rung, budget_s: float, peak_flops: float, vocab_size: int) -> float:
    """About how many tokens a rung trains on in budget_s on a device of this matmul peak."""
    per_token = flops_per_token(rung_config(rung, vocab_size), SEQ_LEN)
    return budget_s * peak_flops * EFFICIENCY / per_token


def choose(
    budget_s: float, peak_flops: float, vocab_size: int, train_tokens: int | None = None
) -> AutoChoice:
    """The largest rung that trains on at least MIN_TOKENS_PER_PARAM tokens per parameter in the
    budget (the smallest when none does); with dropout when that reads the training split
    (train_tokens, when known) more than DROPOUT_EPOCHS times."""
    picked, tokens, params = LADDER[0], 0.0, 0
    for rung in LADDER:
        n = rung_config(rung, vocab_size).num_params()
        d = budget_tokens(rung, budget_s, peak_flops, vocab_size)
        if rung is LADDER[0] or d / n >= MIN_TOKENS_PER_PARAM:
            picked, tokens, params = rung, d, n
    enough = tokens / params >= MIN_TOKENS_PER_PARAM
    why = (
        f"{budget_s:.0f} s at a measured matmul peak of {human_count(peak_flops, 'FLOP/s')} buys "
        f"about {human_count(tokens)} training tokens for a {human_count(params)}-parameter "
        f"model ({tokens / params:.1f} per parameter): "
        + (
            f"the largest shape that sees at least {MIN_TOKENS_PER_PARAM:g} tokens per parameter"
            if enough
            else "the smallest shape, as no shape sees "
            f"{MIN_TOKENS_PER_PARAM:g} tokens per parameter in this budget"
        )
    )
    dropout = 0.0
    if train_tokens and tokens / train_tokens > DROPOUT_EPOCHS:
        dropout = DROPOUT
        epochs = tokens / train_tokens
        why += f"; dropout {DROPOUT:g}, as it reads the training text about {epochs:.0f} times"
    return AutoChoice(
        picked.name,
        dict(picked.model),
        picked.lr,
        picked.batch_size,
        budget_s,
        peak_flops,
        why,
        dropout,
    )


def recorded_choice(run_dir: Path) -> AutoChoice | None:
    """The choice a run recorded (config.json "train" -> "auto"), for --resume."""
    try:
        return AutoChoice(**(read_dir_config(run_dir) or {})["train"]["auto"])
    except (KeyError, TypeError):
        return None
