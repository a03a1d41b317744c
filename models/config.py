"""The model configuration: one dataclass for the original transformer and Llama-style models."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned", "sinusoidal")
MLPS = ("swiglu", "gelu")


class ConfigError(ValueError):
    """A model configuration that cannot describe a working network."""


def _swiglu_hidden(dim: int, multiple_of: int = 32) -> int:
    # Llama's rule: 2/3 of 4*dim keeps SwiGLU's three matrices at the cost of a 4*dim GELU MLP.
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    """Shape and flavour of a decoder-only transformer."""

    vocab_size: int = 2048
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    head_dim: int | None = None  # None: dim // n_heads
    hidden_dim: int | None = None  # None: 4*dim for GELU, Llama's 8/3*dim rule for SwiGLU
    max_seq_len: int = 256
    norm: str = "rmsnorm"
    pos: str = "rope"
    rope_theta: float = 10000.0
    mlp: str = "swiglu"
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(
                    f"model config: dim {self.dim} is not divisible by n_heads {self.n_heads}; "
                    "pick a dim that is a multiple of n_heads or set head_dim"
                )
            self.head_dim = self.dim // self.n_heads
        if self.mlp not in MLPS:
            raise ConfigError(
                f"model config: mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}"
            )
        if self.hidden_dim is None:
            self.hidden_dim = _swiglu_hidden(self.dim) if self.mlp == "swiglu" else 4 * self.dim
        for name in ("n_kv_heads", "head_dim", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model config: n_heads {self.n_heads} must be a multiple of n_kv_heads "
                f"{self.n_kv_heads} (each key/value head serves a whole group of query heads)"
            )
        if self.norm not in NORMS:
            raise ConfigError(
                f"model config: norm must be one of {', '.join(NORMS)}, got {self.norm!r}"
            )
        if self.pos not in POSITIONS:
            raise ConfigError(
                f"model config: pos must be one of {', '.join(POSITIONS)}, got {self.pos!r}"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"model config: rope needs an even head_dim, got {self.head_dim}")
        if self.pos == "sinusoidal" and self.dim % 2:
            raise ConfigError(
                f"model config: sinusoidal positions need an even dim, got {self.dim}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ConfigError("model config: rope_theta and norm_eps must be positive")

    # -- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from a dict, naming any unknown field."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed; derived fields left unset are derived again."""
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    # -- size ----------------------------------------------------------------------------------

    def param_counts(self) -> dict[str, int]:
        """Parameters by component, from the formula (tied weights counted once)."""
        d, h, V = self.dim, self.hidden_dim, self.vocab_size
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        b = 1 if self.bias else 0
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        attn = d * q_dim + 2 * d * kv_dim + q_dim * d + b * (q_dim + 2 * kv_dim + d)
        n_mats = 3 if self.mlp == "swiglu" else 2
        mlp = n_mats * d * h + b * ((n_mats - 1) * h + d)
        L = self.n_layers
        return {
            "embeddings": V * d + (self.max_seq_len * d if self.pos == "learned" else 0),
            "attention": L * attn,
            "mlp": L * mlp,
            "norms": (2 * L + 1) * norm,
            "head": 0 if self.tie_embeddings else V * d,
        }

    def num_params(self) -> int:
        """Total parameter count.

        V·d (+ T·d learned positions) + L·(attention + MLP + 2 norms) + final norm
        (+ V·d for an untied head).
        """
        return sum(self.param_counts().values())
