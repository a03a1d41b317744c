"""Causal multi-head self-attention with grouped-query (GQA/MQA) key/value heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.cache import KVCache
from models.config import ModelConfig
from models.layers import apply_rope

ATTENTION_IMPLS = ("sdpa", "math")


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the T x S score matrix materialised: the reference path."""
    groups = q.size(1) // k.size(1)
    k = k.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).type_as(q)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return probs @ v


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
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
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
        return self.wo(y)
