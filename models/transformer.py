"""The decoder-only transformer: embeddings, pre-norm blocks, final norm, output head.

Training and generation run the same modules. For generation, `prepare_for_inference()` lays the
weights out for the fused one-token step (models/decode.py), and `last_logits()` is the one entry
point a sampler calls: the fused step where it applies, `hidden()` and the head otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.attention import ATTENTION_IMPLS, CausalSelfAttention
from models.cache import KVCache
from models.config import ModelConfig
from models.decode import DecodeStep
from models.fused import linears
from models.layers import Dropout, make_mlp, make_norm, rope_tables, sinusoidal_table
from models.quantize import Bf16Linear, Int8Linear

# Devices where prepare_for_inference(compile=True) compiles the fused one-token step too.
COMPILE_STEP = ("cuda",)


class Block(nn.Module):
    """x = x + attn(norm(x)); x = x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.resid_dropout = Dropout(cfg.dropout)

    def forward(self, x, rope, mask, is_causal, cache=None, layer=0, start=0):
        """x (B, T, d) -> (B, T, d); the arguments after x as CausalSelfAttention takes them."""
        x = x + self.resid_dropout(
            self.attn(self.attn_norm(x), rope, mask, is_causal, cache, layer, start)
        )
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Token embeddings (+ positions), n_layers pre-norm blocks, a final norm, the output head."""

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
        self.drop = Dropout(cfg.dropout)
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
        self.decode_step: DecodeStep | None = None  # the fused one-token step, once prepared
        self._compiled_hidden = None  # hidden() through torch.compile, once prepared so
        self._compiled_step = None  # the fused step through torch.compile (on COMPILE_STEP)

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
        """A zeroed KV cache for this model on its device (max_len: the context window).

        Its dtype is the model's float dtype, or bf16 when the matmul weights are packed bf16
        (models/quantize.py): half the memory, and attention reads it in bf16 either way.
        """
        cfg, ref = self.config, self.tok_emb.weight
        packed_bf16 = isinstance(self.head, Bf16Linear)
        return KVCache(
            cfg.n_layers,
            batch_size,
            cfg.n_kv_heads,
            max_len or cfg.max_seq_len,
            cfg.head_dim,
            dtype=dtype or (torch.bfloat16 if packed_bf16 else ref.dtype),
            device=ref.device,
        )

    # -- the forward pass ----------------------------------------------------------------------

    def embed(self, idx: Tensor, pos: Tensor | int) -> Tensor:
        """Token embeddings plus absolute positions (learned or sinusoidal): (..., dim).

        RoPE models add nothing here: their positions rotate q and k inside attention.
        """
        x = self.tok_emb(idx)
        if self.config.pos == "learned":
            return x + self.pos_emb.weight[pos]
        if self.config.pos == "sinusoidal":
            return x + self.pos_table[pos].to(x.dtype)
        return x

    def rope(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE's cos and sin at pos (T,): (T, hd) each; at per-row pos (B, T): (B, 1, T, hd)."""
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        return (cos.unsqueeze(-3), sin.unsqueeze(-3)) if pos.dim() == 2 else (cos, sin)

    def hidden(
        self,
        idx: Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        pos: Tensor | None = None,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """Final-norm hidden states (B, T, dim) for tokens idx (B, T).

        With a cache, the T tokens are written at cache slots start..start+T and attend to all
        slots before. pos (T,) or (B, T) overrides the positions (default start..start+T), for
        left-padded batches; key_mask (B, S) marks which cache slots hold real tokens.
        """
        T = idx.size(1)
        if pos is None:
            if start + T > self.config.max_seq_len:
                raise ValueError(
                    f"positions up to {start + T} exceed the context window of "
                    f"{self.config.max_seq_len}"
                )
            pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.embed(idx, pos))  # (B, T, d)
        rope = self.rope(pos) if self.config.pos == "rope" else None
        mask, is_causal = self._attention_mask(T, start, cache is not None, key_mask, idx.device)
        for i, block in enumerate(self.layers):
            x = block(x, rope, mask, is_causal, cache, i, start)
        return self.norm(x)

    @staticmethod
    def _attention_mask(
        T: int, start: int, cached: bool, key_mask: Tensor | None, device: torch.device
    ) -> tuple[Tensor | None, bool]:
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

    def forward(self, idx: Tensor, **context) -> Tensor:
        """Logits (B, T, vocab_size) for tokens idx (B, T); context as for hidden()."""
        return linears(self.hidden(idx, **context), (self.head,), self)[0]

    # -- generation ----------------------------------------------------------------------------

    def prepare_for_inference(self, compile: bool = False) -> Transformer:
        """Eval mode and the fast decoding path. Call after .to(); moving again undoes it.

        The q/k/v and gate/up weights are fused for the one-token step (models/decode.py) and
        this model's own parameters are pointed at slices of the fused buffers, so prefill and
        decoding share one copy of the weights. The model computes the same function (to float
        rounding) but is for inference only: training would update views of fused buffers.
        Linear layers already quantized or packed (models/quantize.py) are fused in their own
        form. compile=True also runs hidden() (prefill, uncached steps) through torch.compile,
        and on a GPU the fused step too (dynamic shapes: one graph for every cache slot). On a
        CPU the step stays eager: compiled it ran 0.7-0.85x as fast (gpt-fast's static cache
        included; see the README's "Generation speed").
        """
        if compile and any(isinstance(m, (Int8Linear, Bf16Linear)) for m in self.modules()):
            raise ValueError("torch.compile cannot trace packed (int8 or bf16) weights")
        self.eval()
        self.decode_step = self._compiled_step = None
        if DecodeStep.supports(self):
            with torch.no_grad():
                self.decode_step = DecodeStep(self)
                self.decode_step.bind(self)
        if compile:
            self._compiled_hidden = torch.compile(self.hidden, dynamic=True)
            if self.decode_step is not None and self.tok_emb.weight.device.type in COMPILE_STEP:
                self._compiled_step = torch.compile(self.decode_step.__call__, dynamic=True)
        return self

    @property
    def fused_decoding(self) -> bool:
        """Whether one-token steps into a cache take the fused step (prepared, and still valid)."""
        return self.decode_step is not None and self.decode_step.applies(self)

    def last_logits(
        self,
        idx: Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        *,
        fused: bool = True,
        pos: Tensor | None = None,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, vocab_size) after the last token of idx (B, T): what a sampler draws from.

        Arguments as for hidden(). One token per row into a cache of a prepared model goes
        through the fused step; anything else (a prompt, no cache, fused=False, a model the step
        does not cover) runs hidden() and the head on the last position only.
        """
        if fused and cache is not None and idx.size(1) == 1 and self.fused_decoding:
            positions = start if pos is None else pos[..., -1]  # int, or (B,)
            step = self._compiled_step or self.decode_step
            return step(self, idx[:, 0], cache, start, positions, key_mask)
        hidden = self.hidden if self._compiled_hidden is None else self._compiled_hidden
        return self.head(hidden(idx, cache, start, pos, key_mask)[:, -1])
