"""Named model shapes. Each comment gives the parameter count from ModelConfig.num_params()."""

from __future__ import annotations

from typing import Any

from models.config import ConfigError, ModelConfig

# 15,191,712 (15.2M): llama2.c's "stories15M" shape (tied embeddings, as llama2.c shares the
# classifier).
_SMALL = dict(vocab_size=32000, dim=288, n_layers=6, n_heads=6, hidden_dim=768, max_seq_len=256)

PRESETS: dict[str, dict[str, Any]] = {
    # 639,840 parameters (0.64M): tests and quick demos; trains in minutes on a laptop CPU.
    "nano": dict(vocab_size=2048, dim=96, n_layers=4, n_heads=4, hidden_dim=256, max_seq_len=256),
    # 1,730,176 (1.7M): a step up from nano for quick experiments.
    "micro": dict(vocab_size=4096, dim=128, n_layers=6, n_heads=4, hidden_dim=352, max_seq_len=256),
    # 5,721,344 (5.7M): a few million parameters, 512-token context.
    "tiny": dict(vocab_size=4096, dim=256, n_layers=6, n_heads=8, hidden_dim=672, max_seq_len=512),
    "small": _SMALL,  # 15.2M, above
    # 14,528,160 (14.5M): `small` with grouped-query attention, 2 key/value heads for 6 query heads.
    "small-gqa": {**_SMALL, "n_kv_heads": 2},
    # 124,439,808 (124.4M): the original-transformer decoder as GPT-2 small has it: learned
    # positions, LayerNorm, GELU, biases, tied embeddings, 12 layers x 768.
    "gpt2": dict(
        vocab_size=50257,
        dim=768,
        n_layers=12,
        n_heads=12,
        hidden_dim=3072,
        max_seq_len=1024,
        norm="layernorm",
        pos="learned",
        mlp="gelu",
        bias=True,
        tie_embeddings=True,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The config of a named preset, with fields overridden (e.g. vocab_size=8000)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelConfig.from_dict(fields)
