"""Closed-form cost of a model: parameters, FLOPs and memory, from its config alone.

FLOPs follow models.flops (the run card's MFU uses it): 2 FLOPs per weight per token, plus
4·L·T·H·hd per token for the q·k and p·v products over a length-T context, counted over the
full T×T square as PaLM's formula does (a causal kernel that skips the masked half does about
half of that term). The backward pass costs twice the forward.

Activation memory counts the tensors autograd saves for the backward pass in this code base
(models/), checked against torch.autograd.graph.saved_tensors_hooks in the tests: fp32, or an
fp32 model under bf16/fp16 autocast as `tformer train` runs it. Dropout masks are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.config import ModelConfig
from models.flops import flops_per_token, matmul_params
from tformer_cli.device import DTYPES

FP32 = 4
INDEX = 8  # int64 token ids


def bytes_per_element(precision: str) -> int:
    """Bytes of one element at fp32, bf16 or fp16."""
    return DTYPES[precision].itemsize


# -- FLOPs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopSplit:
    """Forward FLOPs per token at context length T, by where they are spent."""

    attention_proj: int  # q, k, v and output projections
    attention_scores: int  # q·k^T and p·v over the context: grows with T
    mlp: int
    head: int

    @property
    def attention(self) -> int:
        return self.attention_proj + self.attention_scores

    @property
    def forward(self) -> int:
        return self.attention + self.mlp + self.head

    @property
    def training(self) -> int:
        return 3 * self.forward

    @property
    def attention_share(self) -> float:
        return self.attention / self.forward


def score_flops_per_position(cfg: ModelConfig) -> int:
    """Forward FLOPs per token per context position: 2 products (q·k, p·v) x 2 FLOPs x L·H·hd."""
    return 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim


def flop_split(cfg: ModelConfig, seq_len: int) -> FlopSplit:
    """Forward FLOPs per token, split so that the parts add up to models.flops.flops_per_token."""
    counts = cfg.param_counts()
    split = FlopSplit(
        attention_proj=2 * counts["attention"],
        attention_scores=score_flops_per_position(cfg) * seq_len,
        mlp=2 * counts["mlp"],
        head=2 * cfg.vocab_size * cfg.dim,
    )
    assert split.forward == flops_per_token(cfg, seq_len, training=False)
    return split


def attention_crossover(cfg: ModelConfig) -> dict[str, int]:
    """The context lengths T at which attention's FLOPs pass the MLP's.

    "attention": projections + scores > MLP; "scores": the T-dependent term alone > MLP.
    """
    per_t = score_flops_per_position(cfg)
    counts = cfg.param_counts()
    mlp, proj = 2 * counts["mlp"], 2 * counts["attention"]
    return {
        "attention": max(1, math.floor((mlp - proj) / per_t) + 1),
        "scores": math.floor(mlp / per_t) + 1,
    }


def six_n(cfg: ModelConfig) -> int:
    """The 6N rule: training FLOPs per token with N the parameters that take part in a matmul."""
    return 6 * matmul_params(cfg)


# -- memory ----------------------------------------------------------------------------------------


def kv_cache_bytes(
    cfg: ModelConfig, seq_len: int, batch_size: int, elem_bytes: int, kv_heads: int | None = None
) -> int:
    """2 (keys and values) · n_layers · n_kv_heads · head_dim · T · B · bytes per element."""
    heads = cfg.n_kv_heads if kv_heads is None else kv_heads
    return 2 * cfg.n_layers * heads * cfg.head_dim * seq_len * batch_size * elem_bytes


def _norm_bytes(cfg: ModelConfig, consumers: int, low: bool) -> int:
    """Bytes per token saved around one norm whose output feeds `consumers` linears."""
    d = cfg.dim
    if cfg.norm == "rmsnorm":
        # fp32 input and 1/rms for rms_norm, the normalised x for the gain's gradient, and the
        # scaled output the linears keep (under autocast each linear casts its own bf16 copy)
        kept = FP32 * (2 * d + 1)
        return kept + (consumers * 2 * d if low else FP32 * d)
    # layer_norm keeps its input, mean and 1/std; the linears keep its output (or their bf16 copies)
    return FP32 * (d + 2) + (consumers * 2 * d if low else FP32 * d)


def layer_activation_bytes(
    cfg: ModelConfig, seq_len: int, precision: str, attention: str = "sdpa"
) -> int:
    """Bytes one block saves for the backward pass, per token of a length-seq_len sequence."""
    low = precision != "fp32"
    act = 2 if low else FP32
    q_dim, kv_dim, H = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_heads
    # Under autocast training stacks q|k|v (and SwiGLU's gate|up) into one matmul
    # (models/fused.py), fed by one low-precision copy of the norm's output.
    qkv_linears = 1 if low else 3
    total = _norm_bytes(cfg, qkv_linears, low) + _norm_bytes(
        cfg, 2 if cfg.mlp == "swiglu" and not low else 1, low
    )
    if attention == "sdpa":
        total += (
            act * (2 * q_dim + 2 * kv_dim) + FP32 * H
        )  # q, k, v, output, and the row log-sum-exp
        if low and cfg.pos == "rope":
            total += act * (q_dim + kv_dim)  # v, a view of the stacked q|k|v, keeps it whole
    else:
        # q, k and v repeated to all heads, the output's contiguous copy, and the fp32
        # probabilities (plus their low-precision copy)
        total += act * 4 * q_dim + (FP32 + (act if low else 0)) * H * seq_len
    total += act * cfg.hidden_dim * (4 if cfg.mlp == "swiglu" else 2)
    return total


def activation_bytes(
    cfg: ModelConfig, seq_len: int, batch_size: int, precision: str, attention: str = "sdpa"
) -> int:
    """Bytes autograd saves during a training forward pass of B sequences of T tokens."""
    low = precision != "fp32"
    tokens = seq_len * batch_size
    per_token = cfg.n_layers * layer_activation_bytes(cfg, seq_len, precision, attention)
    per_token += _norm_bytes(cfg, 1, low)  # the final norm, feeding the head
    per_token += FP32 * cfg.vocab_size  # log-softmax output (the loss runs in fp32)
    per_token += 2 * INDEX  # input ids (embedding backward) and targets
    total = tokens * per_token
    # what the batch shares: the rope cos/sin rows (and per layer their low-precision casts),
    # learned positions' ids, the math path's causal mask (a T x T bool per layer)
    if cfg.pos == "rope":
        total += seq_len * 2 * cfg.head_dim * FP32
        if low:
            total += cfg.n_layers * seq_len * 2 * cfg.head_dim * 2
    elif cfg.pos == "learned":
        total += seq_len * INDEX
    if attention == "math":
        total += cfg.n_layers * seq_len * seq_len
    if low:
        total += 2 * matmul_params(cfg)  # autocast's low-precision copies of the weights
    return total


def training_memory(
    cfg: ModelConfig, seq_len: int, batch_size: int, precision: str, attention: str = "sdpa"
) -> dict[str, int]:
    """Bytes of a training step with AdamW: fp32 weights, grads, two moments, activations, and
    the peak transient.

    Mixed precision keeps fp32 master weights (autocast), as `tformer train` does.
    """
    n = cfg.num_params()
    tokens = seq_len * batch_size
    parts = {
        "weights": FP32 * n,
        "grads": FP32 * n,
        "optimizer": 2 * FP32 * n,  # AdamW's exp_avg and exp_avg_sq
        "activations": activation_bytes(cfg, seq_len, batch_size, precision, attention),
        # at the start of the backward pass the fp32 gradients of the log-probabilities and of
        # the logits exist side by side: the largest transient of a small-model step
        "transient": tokens * 2 * FP32 * cfg.vocab_size,
    }
    parts["total"] = sum(parts.values())
    return parts


def inference_workspace_bytes(
    cfg: ModelConfig, seq_len: int, batch_size: int, elem_bytes: int, attention: str = "sdpa"
) -> int:
    """Transient bytes of one block during a no-grad prefill of B x T tokens (the largest
    block's worth).

    The residual stream and its norm, q/k/v and their rotated copies, the attention output, and
    the MLP's intermediates; the math path adds the T x T scores and probabilities per head.
    """
    d, q_dim, kv_dim, h = (
        cfg.dim,
        cfg.n_heads * cfg.head_dim,
        cfg.n_kv_heads * cfg.head_dim,
        cfg.hidden_dim,
    )
    per_token = 2 * d + 2 * (q_dim + 2 * kv_dim) + q_dim + (3 if cfg.mlp == "swiglu" else 2) * h
    total = seq_len * batch_size * per_token * elem_bytes
    if attention == "math":
        total += batch_size * cfg.n_heads * seq_len * seq_len * (elem_bytes + 2 * FP32)
    return total + batch_size * cfg.vocab_size * FP32  # logits of the last position


def matmul_rows(cfg: ModelConfig) -> int:
    """Output rows of every matmul weight (the blocks' and the head's): int8's scales."""
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    up = 2 * cfg.hidden_dim if cfg.mlp == "swiglu" else cfg.hidden_dim
    return cfg.n_layers * (q_dim + 2 * kv_dim + cfg.dim + up + cfg.dim) + cfg.vocab_size


def matmul_weight_bytes(cfg: ModelConfig, precision: str, weights: str = "none") -> int:
    """Bytes of the matmul weights, which a decoded token reads once each: at the precision, or
    in the packed form of models.quantize ("int8": a byte per weight and a 4-byte scale per
    output row; "bf16": two bytes per weight)."""
    if weights == "int8":
        return matmul_params(cfg) + 4 * matmul_rows(cfg)
    return matmul_params(cfg) * (2 if weights == "bf16" else bytes_per_element(precision))


def inference_memory(
    cfg: ModelConfig, seq_len: int, batch_size: int, precision: str, weights: str = "none"
) -> dict[str, int]:
    """Bytes of generating with a KV cache: weights at the precision, the cache for T tokens,
    the prefill workspace.

    With packed weights (weights "int8" or "bf16", see matmul_weight_bytes) the embeddings,
    norms and activations are fp32 (a tied head keeps its float embedding besides); the cache
    is at the precision (bf16 with packed bf16 weights, fp32 with int8).
    """
    b = bytes_per_element(precision)
    stored = b * cfg.num_params()
    if weights != "none":
        float_params = cfg.num_params() - matmul_params(cfg)
        if cfg.tie_embeddings:
            float_params += cfg.vocab_size * cfg.dim  # the embedding, apart from the packed head
        stored = FP32 * float_params + matmul_weight_bytes(cfg, precision, weights)
    parts = {
        "weights": stored,
        "kv_cache": kv_cache_bytes(cfg, seq_len, batch_size, b),
        "workspace": inference_workspace_bytes(
            cfg, seq_len, batch_size, FP32 if weights != "none" else b
        ),
    }
    parts["total"] = sum(parts.values())
    return parts


def decode_bytes_per_step(
    cfg: ModelConfig, seq_len: int, batch_size: int, precision: str, weights: str = "none"
) -> int:
    """Bytes a cached decoding step reads: every matmul weight once, and the keys and values of
    T positions."""
    kv = kv_cache_bytes(cfg, seq_len, batch_size, bytes_per_element(precision))
    return matmul_weight_bytes(cfg, precision, weights) + kv


def attention_memory(
    cfg: ModelConfig, seq_len: int, batch_size: int, precision: str, attention: str
) -> int:
    """Bytes of one attention call, forward + backward: inputs, outputs, gradients and (math)
    the T x T matrices."""
    b = bytes_per_element(precision)
    H, hd, Hkv = cfg.n_heads, cfg.head_dim, cfg.n_kv_heads
    io = batch_size * seq_len * hd * (2 * H + 2 * Hkv) * b  # q, k, v, output
    total = 2 * io  # and their gradients
    if attention == "math":
        # scores, fp32 probabilities, and in backward the gradient of the probabilities
        total += batch_size * H * seq_len * seq_len * (b + 2 * FP32) + seq_len * seq_len
    return total
