"""The tformer network, importable on its own: config, presets, transformer, KV cache, weight I/O.

from models import get_preset, Transformer
model = Transformer(get_preset("nano", vocab_size=512))
logits = model(tokens)  # (B, T) -> (B, T, vocab_size)
model.prepare_for_inference()  # fused one-token decoding for model.last_logits(...)
"""

from models.attention import CausalSelfAttention, math_attention
from models.cache import KVCache
from models.config import ConfigError, ModelConfig
from models.presets import PRESETS, get_preset
from models.transformer import Block, Transformer
from models.weights import CheckpointError, load_config, load_model, save_model

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Block",
    "CausalSelfAttention",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "get_preset",
    "load_config",
    "load_model",
    "math_attention",
    "save_model",
]
