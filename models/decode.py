"""The fused one-token step: decoding one new token per row through the KV cache.

`Transformer.prepare_for_inference()` builds it and `Transformer.last_logits()` calls it. It is
`Transformer.hidden` + the head at a single cached position, in a fraction of the ops: the
q/k/v matrices and SwiGLU's gate/up matrices are fused into one matmul each, the residual adds
ride on `addmm`, and RoPE is one `addcmul`. Decoding a small model on a CPU is bound by per-op
overhead and by reading the weights once per token, so both matter. Embeddings and norms are
the model's own (`Transformer.embed`, the norm modules' forward).

Weights are kept as the right operand of `x @ W`. On the CPU in fp32 they are stored
transposed, (in, out) contiguous: MKL's matrix-vector product reads that layout 2-3x as fast
for the 32000 x 288 head as the (out, in) layout nn.Linear keeps (bf16 wants the opposite).
`bind()` points the model's own parameters at slices of these buffers, so prefill and decoding
share one copy of the weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.cache import KVCache
from models.layers import GeluMLP, SwiGLU

if TYPE_CHECKING:
    from models.transformer import Transformer


def _transposed_layout(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether weights are stored (in, out): fp32 on the CPU; elsewhere nn.Linear's layout wins."""
    return device.type == "cpu" and dtype == torch.float32


class _Operand:
    """A fused weight matrix as the right operand of x @ W, with its optional bias."""

    def __init__(self, linears: list[nn.Linear], transposed: bool):
        weights = [lin.weight.detach() for lin in linears]
        stacked = torch.cat(weights) if len(weights) > 1 else weights[0]  # (out, in) rows
        # kept as (in, out) contiguous, or as a transposed view of the contiguous rows
        self.storage = stacked.t().contiguous() if transposed else stacked.contiguous()
        self.w = self.storage if transposed else self.storage.t()  # (in, out) either way
        self.transposed = transposed
        self.bias = None
        if any(lin.bias is not None for lin in linears):
            self.bias = torch.cat([lin.bias.detach() for lin in linears]).contiguous()

    def rows(self, start: int, end: int) -> Tensor:
        """The (out, in) weight of output rows start..end, as a view into the fused storage."""
        return self.storage[:, start:end].t() if self.transposed else self.storage[start:end]

    def bind(self, linears: list[nn.Linear]) -> None:
        """Point each Linear's weight and bias at its slice of the fused buffers."""
        start = 0
        for lin in linears:
            end = start + lin.out_features
            lin.weight.data = self.rows(start, end)
            if lin.bias is not None and self.bias is not None:
                lin.bias.data = self.bias[start:end]
            start = end

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x @ W (+ bias) (+ residual)."""
        if self.bias is None:
            return x @ self.w if residual is None else torch.addmm(residual, x, self.w)
        y = torch.addmm(self.bias, x, self.w)
        return y if residual is None else residual + y


def _linear_groups(block: nn.Module) -> dict[str, list[nn.Linear]]:
    """A block's Linear layers by fused operand: q|k|v, the output, (gate|)up, down."""
    attn, mlp = block.attn, block.mlp
    up = [mlp.w1, mlp.w3] if isinstance(mlp, SwiGLU) else [mlp.w1]
    return {"qkv": [attn.wq, attn.wk, attn.wv], "wo": [attn.wo], "up": up, "down": [mlp.w2]}


class _Layer:
    """One block's fused operands, and its norms (the modules' own forward)."""

    def __init__(self, block: nn.Module, transposed: bool):
        # bound forward methods: the norms' own math, without nn.Module's call overhead per token
        self.attn_norm, self.mlp_norm = block.attn_norm.forward, block.mlp_norm.forward
        self.swiglu = isinstance(block.mlp, SwiGLU)
        self.groups = _linear_groups(block)
        ops = {name: _Operand(lins, transposed) for name, lins in self.groups.items()}
        self.qkv, self.wo, self.up, self.down = ops["qkv"], ops["wo"], ops["up"], ops["down"]

    def bind(self) -> None:
        for name, lins in self.groups.items():
            getattr(self, name).bind(lins)


class DecodeStep:
    """Logits (B, V) for one new token per row, written into the cache at one slot."""

    def __init__(self, model: Transformer):
        cfg, ref = model.config, model.tok_emb.weight
        transposed = _transposed_layout(ref.dtype, ref.device)
        self.layers = [_Layer(block, transposed) for block in model.layers]
        self.head = _Operand([model.head], transposed)
        self.final_norm = model.norm.forward
        self.n_q, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.hidden_dim = cfg.hidden_dim
        self.rope = cfg.pos == "rope"
        if self.rope:
            # rotate_half(x) * sin == roll(x, hd/2) * [-sin | sin]: one addcmul instead of five ops
            sign = torch.ones(cfg.head_dim, dtype=model.rope_sin.dtype, device=ref.device)
            sign[: cfg.head_dim // 2] = -1
            self.cos = model.rope_cos.to(ref.dtype)
            self.sin = (model.rope_sin * sign).to(ref.dtype)

    @staticmethod
    def supports(model: Transformer) -> bool:
        """True for plain Linear layers (no LoRA wrappers or sharded weights) and sdpa attention."""
        if model.training or any(type(p.data) is not torch.Tensor for p in model.parameters()):
            return False  # e.g. FSDP's DTensors: only the module's own forward gathers them
        for block in model.layers:
            if not isinstance(block.mlp, (SwiGLU, GeluMLP)) or block.attn.impl != "sdpa":
                return False
            linears = [lin for group in _linear_groups(block).values() for lin in group]
            if any(type(lin) is not nn.Linear for lin in linears):
                return False
        return type(model.head) is nn.Linear

    def bind(self, model: Transformer) -> None:
        """Point the model's parameters at the fused buffers (the tied embedding too)."""
        for layer in self.layers:
            layer.bind()
        self.head.bind([model.head])

    def applies(self, model: Transformer) -> bool:
        """Whether the model still computes what this step does: in eval mode, sdpa attention,
        and its parameters still in the fused buffers (not moved or cast since)."""
        qkv = model.layers[0].attn.wq.weight
        return (
            not model.training
            and qkv.data_ptr() == self.layers[0].qkv.storage.data_ptr()
            and model.head.weight.data_ptr() == self.head.storage.data_ptr()
            and model.head.weight.dtype == self.head.storage.dtype
            and all(block.attn.impl == "sdpa" for block in model.layers)
        )

    def __call__(
        self,
        model: Transformer,
        tokens: Tensor,
        cache: KVCache,
        slot: int,
        positions: Tensor | int,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """tokens (B,) written at cache slot `slot`, at positions (int or (B,)); key_mask (B, S)
        marks the slots that hold real tokens."""
        B = tokens.size(0)
        n_q, n_kv, hd = self.n_q, self.n_kv, self.hd
        x = model.embed(tokens, positions)  # (B, d)
        if self.rope:
            cos, sin = self.cos[positions], self.sin[positions]  # (hd,) or (B, hd)
            if cos.dim() == 2:
                cos, sin = cos[:, None], sin[:, None]  # (B, 1, hd): one row per sequence
        q_dim, qk_dim = n_q * hd, (n_q + n_kv) * hd
        mask = None if key_mask is None else key_mask[:, None, None, : slot + 1]
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(layer.attn_norm(x))  # (B, q + 2 kv)
            qk = qkv[:, :qk_dim].view(B, n_q + n_kv, hd)
            if self.rope:
                qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin)
            cache.k[i, :, :, slot] = qk[:, n_q:]
            cache.v[i, :, :, slot] = qkv[:, qk_dim:].view(B, n_kv, hd)
            k, v = cache.k[i, :, :, : slot + 1], cache.v[i, :, :, : slot + 1]  # (B, Hkv, S, hd)
            y = F.scaled_dot_product_attention(
                qk[:, :n_q, None].to(k.dtype), k, v, attn_mask=mask, enable_gqa=n_kv != n_q
            )  # (B, H, 1, hd)
            x = layer.wo(y.reshape(B, q_dim).to(x.dtype), residual=x)
            x = layer.down(self._activation(layer, layer.up(layer.mlp_norm(x))), residual=x)
        return self.head(self.final_norm(x))

    def _activation(self, layer: _Layer, up: Tensor) -> Tensor:
        """SwiGLU's silu(gate) * up, or GELU (tanh) of the up projection."""
        if layer.swiglu:
            return F.silu(up[:, : self.hidden_dim]) * up[:, self.hidden_dim :]
        return F.gelu(up, approximate="tanh")
