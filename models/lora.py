"""LoRA (Hu et al. 2021): train a low-rank update B·A next to each frozen weight W.

    y = W x + (alpha / r) · B A x,   A: (r, d_in) random, B: (d_out, r) zero

B starts at zero, so a freshly wrapped model computes exactly what the base model does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = {
    "q": ("attn.wq",),
    "k": ("attn.wk",),
    "v": ("attn.wv",),
    "o": ("attn.wo",),
    "mlp": ("mlp.w1", "mlp.w2", "mlp.w3"),
}


class LoRALinear(nn.Module):
    """A frozen Linear W plus its trainable low-rank update: W x + scale · B A x."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear whose weight is W + scale · B A."""
        with torch.no_grad():
            self.base.weight += self.scale * (self.lora_b @ self.lora_a).to(self.base.weight.dtype)
        return self.base


def target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Module names of the Linear layers the targets (q, k, v, o, mlp) pick."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(
            f"unknown LoRA target(s) {', '.join(unknown)}: choose from {', '.join(TARGETS)}"
        )
    suffixes = tuple(s for t in targets for s in TARGETS[t])
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.endswith(suffixes)
    ]


def apply_lora(
    model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0
) -> list[str]:
    """Freeze the model and wrap the targeted Linear layers in LoRA; returns their names."""
    names = target_names(model, targets)
    if not names:
        raise ValueError(f"LoRA targets {', '.join(targets)} match no layer of this model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return names


def lora_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors out of a LoRA-wrapped model's state dict."""
    return {k: v for k, v in state.items() if k.endswith((".lora_a", ".lora_b"))}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight, leaving a plain model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())
    return model
