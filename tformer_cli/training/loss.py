"""The language-modelling loss, shared by pretraining, fine-tuning and the benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # targets with this id (masked prompt tokens, padding) add no loss


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of model(x) against y, in fp32; targets equal to IGNORE
    are skipped."""
    logits = model(x)
    targets = y.reshape(-1)
    total = F.cross_entropy(
        logits.float().view(-1, logits.size(-1)), targets, ignore_index=IGNORE, reduction="sum"
    )
    return total / (targets != IGNORE).sum().clamp(min=1)  # a batch without targets adds 0, not NaN
