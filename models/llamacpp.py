"""Name and layout maps between tformer weights and llama.cpp's GGUF tensors and metadata.

Pure tensor work: the `gguf` package is never imported here. llama.cpp's "llama" architecture
rotates interleaved pairs (q0,q1), (q2,q3), ... while tformer (like Hugging Face's Llama) rotates
the two halves of each head against each other, so q and k rows are permuted on the way out,
exactly as llama.cpp's own convert_hf_to_gguf.py does.
"""

from __future__ import annotations

from typing import Any

import torch

from models.config import ModelConfig
from models.hf import hf_architecture

_LLAMA_LAYER = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.wq.weight": "attn_q.weight",
    "attn.wk.weight": "attn_k.weight",
    "attn.wv.weight": "attn_v.weight",
    "attn.wo.weight": "attn_output.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.w1.weight": "ffn_gate.weight",
    "mlp.w3.weight": "ffn_up.weight",
    "mlp.w2.weight": "ffn_down.weight",
}

_GPT2_LAYER = {
    "attn_norm": "attn_norm",
    "attn.wo": "attn_output",
    "mlp_norm": "ffn_norm",
    "mlp.w1": "ffn_up",
    "mlp.w2": "ffn_down",
}


def gguf_architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture name for this config ("llama" or "gpt2"), or a ConfigError."""
    return {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}[hf_architecture(cfg)]


def rope_halves_to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from rotate-half layout to llama.cpp's interleaved-pair layout."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def rope_pairs_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of rope_halves_to_pairs."""
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def to_gguf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """tformer tensor names -> llama.cpp names.

    Torch layout; a tied head is left out, as llama.cpp expects.
    """
    arch = gguf_architecture(cfg)
    out = {"token_embd.weight": state["tok_emb.weight"], "output_norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = state["head.weight"]
    if arch == "gpt2":
        out["position_embd.weight"] = state["pos_emb.weight"]
        out["output_norm.bias"] = state["norm.bias"]
    for i in range(cfg.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        if arch == "llama":
            for ours, theirs in _LLAMA_LAYER.items():
                out[b + theirs] = state[p + ours]
            out[b + "attn_q.weight"] = rope_halves_to_pairs(
                state[p + "attn.wq.weight"], cfg.n_heads
            )
            out[b + "attn_k.weight"] = rope_halves_to_pairs(
                state[p + "attn.wk.weight"], cfg.n_kv_heads
            )
            continue
        for kind in ("weight", "bias"):
            out[f"{b}attn_qkv.{kind}"] = torch.cat(
                [state[f"{p}attn.{w}.{kind}"] for w in ("wq", "wk", "wv")]
            )
            for ours, theirs in _GPT2_LAYER.items():
                out[f"{b}{theirs}.{kind}"] = state[f"{p}{ours}.{kind}"]
    return out


def gguf_metadata(cfg: ModelConfig) -> dict[str, Any]:
    """The architecture's hyperparameter keys (without the "ARCH." prefix) and their values."""
    arch = gguf_architecture(cfg)
    meta: dict[str, Any] = {
        "context_length": cfg.max_seq_len,
        "embedding_length": cfg.dim,
        "block_count": cfg.n_layers,
        "feed_forward_length": cfg.hidden_dim,
        "attention.head_count": cfg.n_heads,
        "vocab_size": cfg.vocab_size,
    }
    if arch == "gpt2":
        meta["attention.layer_norm_epsilon"] = cfg.norm_eps
        return meta
    meta.update(
        {
            "attention.head_count_kv": cfg.n_kv_heads,
            "attention.key_length": cfg.head_dim,
            "attention.value_length": cfg.head_dim,
            "attention.layer_norm_rms_epsilon": cfg.norm_eps,
            "rope.dimension_count": cfg.head_dim,
            "rope.freq_base": cfg.rope_theta,
        }
    )
    return meta
