"""Causal multi-head self-attention with grouped-query (GQA/MQA) key/value heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models import layers
from models.cache import KVCache
from models.config import ModelConfig
from models.fused import linears
from models.layers import apply_rope

ATTENTION_IMPLS = ("sdpa", "math")


def training_attention(device_type: str, dropout: float) -> str:
    """The attention implementation that trains fastest, by the rule measured on CPUs (forward
    and backward, T = 64..1024, fp32 and bf16; the README's "Training speed"):

    - without attention dropout, "sdpa": the fused kernel (flash on a CPU) took 0.55-0.6x the
      time of the explicit matmuls at every T and precision measured, short contexts included;
    - with dropout on a CPU, "math": SDPA has no CPU kernel that drops out and falls back to its
      own materialised scores with a bernoulli mask; ours (dropout() in layers.py) made a step
      of the nanoGPT shape 1.2x faster;
    - on a GPU, "sdpa": its flash and memory-efficient kernels drop out themselves.

    A run records the choice (train_state/state.json) and --resume reuses it: the two draw
    their dropout masks differently.
    """
    return "math" if device_type == "cpu" and dropout > 0 else "sdpa"


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the T x S score matrix materialised: the reference path.

    The scores are softmaxed in fp32 and the probabilities multiply v in q's dtype (bf16 under
    autocast): plain matmuls, which at short contexts beat a CPU's fused kernel in training.
    """
    groups = q.size(1) // k.size(1)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
        v = v.repeat_interleave(groups, dim=1)
    scores = (q / math.sqrt(q.size(-1))) @ k.transpose(-2, -1)  # (B, H, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return layers.dropout(probs, dropout) @ v


class CausalSelfAttention(nn.Module):
    """Multi-head attention over the tokens so far; n_kv_heads < n_heads shares each key/value
    head among a group of query heads (GQA, or MQA with one)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.impl = "sdpa"

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
    ) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d). With a cache, this layer's k and v are written at slots
        start..start+T and the queries attend to every slot up to there."""
        B, T, _ = x.shape
        q, k, v = (  # (B, H, T, hd) and (B, Hkv, T, hd) twice; one matmul in training
            y.view(B, T, -1, self.head_dim).transpose(1, 2)
            for y in linears(x, (self.wq, self.wk, self.wv), self)
        )
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, Hkv, S, hd), S = start + T
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        if self.impl == "math":
            y = math_attention(q, k, v, mask, is_causal, dropout)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=is_causal,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return linears(y, (self.wo,), self)[0]
