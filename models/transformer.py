"""The decoder-only transformer: embeddings, pre-norm blocks, final norm, output head."""

from __future__ import annotations

import math

import torch
from torch import nn

from models.attention import ATTENTION_IMPLS, CausalSelfAttention
from models.cache import KVCache
from models.config import ModelConfig
from models.layers import make_mlp, make_norm, rope_tables, sinusoidal_table


class Block(nn.Module):
    """x = x + attn(norm(x)); x = x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, is_causal, cache=None, layer=0, start=0):
        x = x + self.resid_dropout(
            self.attn(self.attn_norm(x), rope, mask, is_causal, cache, layer, start)
        )
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.pos == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim)
        elif cfg.pos == "sinusoidal":
            self.register_buffer(
                "pos_table", sinusoidal_table(cfg.dim, cfg.max_seq_len), persistent=False
            )
        else:
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds variance, so shrink the output projections.
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_attention(self, impl: str) -> None:
        """Choose the attention implementation: "sdpa" (fused) or "math" (explicit T x T scores)."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}"
            )
        for block in self.layers:
            block.attn.impl = impl

    def new_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A zeroed KV cache for this model on its device (max_len defaults to the context window)."""
        cfg, ref = self.config, self.tok_emb.weight
        return KVCache(
            cfg.n_layers,
            batch_size,
            cfg.n_kv_heads,
            max_len or cfg.max_seq_len,
            cfg.head_dim,
            dtype=dtype or ref.dtype,
            device=ref.device,
        )

    def hidden(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        pos: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim) for tokens idx (B, T).

        With a cache, the T tokens are written at cache slots start..start+T and attend to all
        slots before. pos (T,) or (B, T) overrides the positions (default start..start+T), for
        left-padded batches; key_mask (B, S) marks which cache slots hold real tokens.
        """
        B, T = idx.shape
        cfg = self.config
        if pos is None:
            if start + T > cfg.max_seq_len:
                raise ValueError(
                    f"positions up to {start + T} exceed the context window of {cfg.max_seq_len}"
                )
            pos = torch.arange(start, start + T, device=idx.device)
        x = self.tok_emb(idx)  # (B, T, d)
        rope = None
        if cfg.pos == "learned":
            x = x + self.pos_emb(pos)
        elif cfg.pos == "sinusoidal":
            x = x + self.pos_table[pos].to(x.dtype)
        else:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (T, hd) or (B, T, hd)
            rope = (cos.unsqueeze(-3), sin.unsqueeze(-3)) if pos.dim() == 2 else (cos, sin)
        x = self.drop(x)
        mask, is_causal = self._attention_mask(T, start, cache is not None, key_mask, idx.device)
        for i, block in enumerate(self.layers):
            x = block(x, rope, mask, is_causal, cache, i, start)
        return self.norm(x)

    @staticmethod
    def _attention_mask(
        T: int, start: int, cached: bool, key_mask: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for T queries at slots start.. over S = start + T keys."""
        S = start + T if cached else T
        if key_mask is None:
            if T == 1:
                return None, False  # one query sees every key before it: nothing to mask
            if S == T:
                return None, True  # the fused causal kernel
        mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)  # (T, S)
        if key_mask is not None:
            # A pad query would see no key at all and turn NaN (which 0-weights then spread);
            # letting every query see itself keeps it finite. Real queries never see pads.
            itself = (
                torch.arange(S, device=device)[None, :]
                == torch.arange(S - T, S, device=device)[:, None]
            )
            mask = (mask & key_mask[:, None, :S].bool()) | itself  # (B, T, S)
            mask = mask.unsqueeze(1)  # (B, 1, T, S)
        return mask, False

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        pos: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for tokens idx (B, T); see hidden() for the arguments."""
        return self.head(self.hidden(idx, cache, start, pos, key_mask))
