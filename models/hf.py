"""Name and layout maps between tformer weights and Hugging Face's Llama and GPT-2 models.

Pure dictionary work on tensors: `transformers` is never imported here.
"""

from __future__ import annotations

from typing import Any

import torch

from models.config import ConfigError, ModelConfig

_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}


def hf_architecture(cfg: ModelConfig) -> str:
    """Which Hugging Face class holds this config, or a ConfigError saying why none does."""
    if (cfg.norm, cfg.pos, cfg.mlp) == ("rmsnorm", "rope", "swiglu") and not cfg.bias:
        return "LlamaForCausalLM"
    if (cfg.norm, cfg.pos, cfg.mlp) == ("layernorm", "learned", "gelu") and cfg.bias:
        if (
            cfg.n_kv_heads == cfg.n_heads
            and cfg.head_dim * cfg.n_heads == cfg.dim
            and cfg.tie_embeddings
        ):
            return "GPT2LMHeadModel"
    raise ConfigError(
        f"no Hugging Face architecture matches norm={cfg.norm} pos={cfg.pos} mlp={cfg.mlp} "
        f"bias={cfg.bias}: Llama needs rmsnorm+rope+swiglu without bias, GPT-2 needs "
        "layernorm+learned+gelu with bias, tied embeddings and plain multi-head attention"
    )


# ModelConfig field: (LlamaConfig key, GPT2Config key), in the order the configs list them
_HF_KEYS = {
    "vocab_size": ("vocab_size", "vocab_size"),
    "dim": ("hidden_size", "n_embd"),
    "hidden_dim": ("intermediate_size", "n_inner"),
    "n_layers": ("num_hidden_layers", "n_layer"),
    "n_heads": ("num_attention_heads", "n_head"),
    "n_kv_heads": ("num_key_value_heads", None),
    "head_dim": ("head_dim", None),
    "max_seq_len": ("max_position_embeddings", "n_positions"),
    "norm_eps": ("rms_norm_eps", "layer_norm_epsilon"),
    "rope_theta": ("rope_theta", None),
    "tie_embeddings": ("tie_word_embeddings", None),  # GPT-2's head is always the embedding
}


def _hf_fields(cfg: ModelConfig, column: int) -> dict[str, Any]:
    """The config's fields under one architecture's names (column 0: Llama, 1: GPT-2)."""
    return {
        keys[column]: getattr(cfg, field)
        for field, keys in _HF_KEYS.items()
        if keys[column] is not None
    }


def llama_config(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers LlamaConfig as a dict."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_hf_fields(cfg, 0),
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }


def config_from_llama(hf: dict[str, Any]) -> ModelConfig:
    """A tformer config from a Hugging Face Llama config.json dict."""
    if hf.get("model_type") != "llama":
        raise ConfigError(f"unsupported architecture {hf.get('model_type')!r}: only llama imports")
    # transformers 5 keeps rope settings in rope_parameters, 4.x in rope_theta / rope_scaling
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        kind = rope.get("rope_type", rope.get("type"))
        raise ConfigError(f"rope scaling {kind!r} is not supported, only plain RoPE")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("Llama checkpoints with attention or MLP biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported hidden_act {hf.get('hidden_act')!r}: only silu")
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        hidden_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def to_llama_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """tformer tensor names -> LlamaForCausalLM names."""
    out = {
        "model.embed_tokens.weight": state["tok_emb.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    out["lm_head.weight"] = state["tok_emb.weight"] if cfg.tie_embeddings else state["head.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs in _LLAMA_LAYER.items():
            out[f"model.layers.{i}.{theirs}"] = state[f"layers.{i}.{ours}"]
    return out


def from_llama_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM tensor names -> tformer names (head.weight left out when tied)."""
    out = {
        "tok_emb.weight": state["model.embed_tokens.weight"],
        "norm.weight": state["model.norm.weight"],
    }
    if not cfg.tie_embeddings:
        out["head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs in _LLAMA_LAYER.items():
            out[f"layers.{i}.{ours}"] = state[f"model.layers.{i}.{theirs}"]
    return out


def gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers GPT2Config as a dict (hf_architecture has checked that GPT-2 fits)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        **_hf_fields(cfg, 1),
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


def to_gpt2_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """tformer tensor names -> GPT2LMHeadModel names (its Conv1D keeps weights as (in, out))."""
    out = {
        "transformer.wte.weight": state["tok_emb.weight"],
        "transformer.wpe.weight": state["pos_emb.weight"],
        "transformer.ln_f.weight": state["norm.weight"],
        "transformer.ln_f.bias": state["norm.bias"],
        "lm_head.weight": state["tok_emb.weight"],
    }
    for i in range(cfg.n_layers):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        qkv = [state[f"{p}attn.{w}.weight"] for w in ("wq", "wk", "wv")]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t().contiguous()
        out[h + "attn.c_attn.bias"] = torch.cat(
            [state[f"{p}attn.{w}.bias"] for w in ("wq", "wk", "wv")]
        )
        out[h + "attn.c_proj.weight"] = state[p + "attn.wo.weight"].t().contiguous()
        out[h + "attn.c_proj.bias"] = state[p + "attn.wo.bias"]
        out[h + "mlp.c_fc.weight"] = state[p + "mlp.w1.weight"].t().contiguous()
        out[h + "mlp.c_fc.bias"] = state[p + "mlp.w1.bias"]
        out[h + "mlp.c_proj.weight"] = state[p + "mlp.w2.weight"].t().contiguous()
        out[h + "mlp.c_proj.bias"] = state[p + "mlp.w2.bias"]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[f"{h}{theirs}.weight"] = state[f"{p}{ours}.weight"]
            out[f"{h}{theirs}.bias"] = state[f"{p}{ours}.bias"]
    return out
