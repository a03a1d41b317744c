"""Analytic cost of the network: the FLOP counts that MFU and `tformer profile` use."""

from __future__ import annotations

from models.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: attention, MLP and the output head.

    Token and position embeddings are lookups and norms are elementwise, so they cost ~no FLOPs.
    """
    counts = cfg.param_counts()
    return counts["attention"] + counts["mlp"] + cfg.vocab_size * cfg.dim


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> int:
    """Model FLOPs per token: 6N + 12·L·T·(H·hd) for a training step (PaLM's formula).

    The forward pass alone costs a third of it.

    2N for the forward matmuls (one multiply-add per weight), 2·L·T·(H·hd)·2 for the q·k and p·v
    products over a length-T context; the backward pass costs twice the forward.
    """
    forward = 2 * matmul_params(cfg) + 4 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return 3 * forward if training else forward
