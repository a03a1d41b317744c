"""Building blocks: normalisation, position encodings and the feed-forward networks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.fused import linears


class RMSNorm(nn.Module):
    """x / rms(x) * g (Zhang & Sennrich 2019), computed in fp32 as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The configured norm: RMSNorm, or LayerNorm (with a bias when the config has biases)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout (Srivastava et al. 2014): zero each element with probability p and scale
    the rest by 1 / (1 - p).

    On a CPU the mask is drawn as uniform floats compared with p: torch's own dropout draws it
    with bernoulli_, which took 2.5x as long and, with attention dropout, a third of a training
    step. Elsewhere it is torch's fused kernel.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p)
    keep = torch.rand(x.shape, device=x.device) >= p
    return torch.where(keep, x / (1.0 - p), 0.0)


class Dropout(nn.Module):
    """nn.Dropout through dropout() above."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


# -- positions --------------------------------------------------------------------------------


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (max_len, head_dim) each, in Hugging Face Llama's rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+hd/2}) pair by its position's angle.

    x: (B, H, T, hd); cos, sin: (T, hd), or (B, 1, T, hd) for per-row positions.
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def sinusoidal_table(dim: int, max_len: int) -> torch.Tensor:
    """The fixed encoding of Vaswani et al. 2017, (max_len, dim).

    PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)).
    """
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)
    return table


# -- feed-forward -----------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer 2020), as in Llama."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.bias)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.bias)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.bias)  # down
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linears(x, (self.w1, self.w3), self)  # one matmul in training
        return self.dropout(linears(F.silu(gate) * up, (self.w2,), self)[0])


class GeluMLP(nn.Module):
    """w2(gelu(w1 x)), the original transformer's MLP with GPT-2's tanh GELU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.bias)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.bias)  # down
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (up,) = linears(x, (self.w1,), self)
        return self.dropout(linears(F.gelu(up, approximate="tanh"), (self.w2,), self)[0])


def make_mlp(cfg: ModelConfig) -> nn.Module:
    """The configured feed-forward network: SwiGLU or the GELU MLP."""
    return SwiGLU(cfg) if cfg.mlp == "swiglu" else GeluMLP(cfg)
