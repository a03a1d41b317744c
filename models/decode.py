"""The fused one-token step: decoding one new token per row through the KV cache.

`Transformer.prepare_for_inference()` builds it and `Transformer.last_logits()` calls it. It is
`Transformer.hidden` + the head at a single cached position, in a fraction of the ops: the
q/k/v matrices and SwiGLU's gate/up matrices are fused into one matmul each, the residual adds
ride on the matmuls, RoPE is one `addcmul`, and each step takes its cache slot's views once
rather than slicing the cache per layer. Decoding a small model on a CPU is bound by per-op
overhead and by reading the weights once per token, so both matter. Embeddings are the model's
own (`Transformer.embed`); norms are the modules' math (an fp32 RMSNorm written out in four ops).

The matmuls take the form of the model's Linear layers (models/quantize.py):
- nn.Linear (float weights): the fused weights are the right operand of `x @ W`. On the CPU in
  fp32 they are stored transposed, (in, out) contiguous: MKL's matrix-vector product reads that
  layout 2-3x as fast for the 32000 x 288 head as the (out, in) layout nn.Linear keeps (bf16
  wants the opposite). `bind()` points the model's own parameters at slices of these buffers,
  so prefill and decoding share one copy of the weights.
- Int8Linear and Bf16Linear (packed weights, fp32 activations): a fused group (q|k|v, gate|up)
  is packed once more as one matrix, a copy, since a packed matrix cannot be sliced; a single
  layer (the output projection, down, the head) uses the layer's own packed weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.cache import KVCache
from models.layers import GeluMLP, RMSNorm, SwiGLU
from models.quantize import Bf16Linear, Int8Linear, bf16_matmul, fuse_bf16, fuse_int8

if TYPE_CHECKING:
    from models.transformer import Transformer

LINEARS = (nn.Linear, Int8Linear, Bf16Linear)  # the layer types the step can fuse


def _transposed_layout(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether weights are stored (in, out): fp32 on the CPU; elsewhere nn.Linear's layout wins."""
    return device.type == "cpu" and dtype == torch.float32


class _Dense:
    """Float Linear layers fused as the right operand of x @ W, with their optional bias."""

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

    def bind(self, linears: list[nn.Module]) -> None:
        """Point each Linear's weight and bias at its slice of the fused buffers."""
        start = 0
        for lin in linears:
            end = start + lin.out_features
            lin.weight.data = self.rows(start, end)
            if lin.bias is not None and self.bias is not None:
                lin.bias.data = self.bias[start:end]
            start = end

    def holds(self, linears: list[nn.Module]) -> bool:
        """Whether the layers' weights still live in this operand's buffers (not moved or cast)."""
        weight = getattr(linears[0], "weight", None)
        return (
            weight is not None
            and weight.data_ptr() == self.storage.data_ptr()
            and weight.dtype == self.storage.dtype
        )

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x @ W (+ bias) (+ residual)."""
        if self.bias is None:
            return x @ self.w if residual is None else torch.addmm(residual, x, self.w)
        y = torch.addmm(self.bias, x, self.w)
        return y if residual is None else residual + y


class _Packed:
    """Int8Linear or Bf16Linear layers fused into one packed matrix: fp32 in, fp32 out."""

    def __init__(self, linears: list[nn.Module]):
        self.layers = list(linears)
        self.int8 = isinstance(linears[0], Int8Linear)
        if self.int8:
            self.packed, self.bias = fuse_int8(self.layers), None  # the bias is in the pack
        else:
            self.packed, self.bias = fuse_bf16(self.layers)

    def bind(self, linears: list[nn.Module]) -> None:
        """Nothing to point: the layers keep their own packed weights."""

    def holds(self, linears: list[nn.Module]) -> bool:
        """Whether these are still the layers the fused matrix was made from."""
        return len(linears) == len(self.layers) and all(
            a is b for a, b in zip(linears, self.layers, strict=True)
        )

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x W^T (+ bias) (+ residual), x fp32 (B, in)."""
        if self.int8:
            y = torch.ops.quantized.linear_dynamic(x, self.packed, False)
            return y if residual is None else y.add_(residual)
        y = bf16_matmul(x.to(torch.bfloat16), self.packed, self.bias)
        return y.float() if residual is None else residual + y  # fp32 + bf16 is fp32


def _operand(linears: list[nn.Module], transposed: bool) -> _Dense | _Packed:
    """The fused operand for a group of layers of one type."""
    if type(linears[0]) is nn.Linear:
        return _Dense(linears, transposed)
    return _Packed(linears)


def _linear_groups(block: nn.Module) -> dict[str, list[nn.Module]]:
    """A block's Linear layers by fused operand: q|k|v, the output, (gate|)up, down."""
    attn, mlp = block.attn, block.mlp
    up = [mlp.w1, mlp.w3] if isinstance(mlp, SwiGLU) else [mlp.w1]
    return {"qkv": [attn.wq, attn.wk, attn.wv], "wo": [attn.wo], "up": up, "down": [mlp.w2]}


def _one_type(linears: list[nn.Module]) -> bool:
    """Whether the layers are all plain float, all int8 or all packed bf16 (not LoRA-wrapped)."""
    kind = type(linears[0])
    return kind in LINEARS and all(type(lin) is kind for lin in linears)


def _norm(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The norm's math for one token per row, without nn.Module's call overhead.

    An fp32 RMSNorm is written out: on the CPU F.rms_norm decomposes into more ops (and copies)
    than these four, which saved about 4% of a `small` step. Anything else is the module's own
    forward, bound.
    """
    if not isinstance(module, RMSNorm) or module.weight.dtype != torch.float32:
        return module.forward
    weight, eps = module.weight, module.eps

    def rms_norm(x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps)) * weight

    return rms_norm


class _Layer:
    """One block's fused operands, and its norms."""

    def __init__(self, block: nn.Module, transposed: bool):
        self.attn_norm, self.mlp_norm = _norm(block.attn_norm), _norm(block.mlp_norm)
        self.swiglu = isinstance(block.mlp, SwiGLU)
        self.groups = _linear_groups(block)
        ops = {name: _operand(lins, transposed) for name, lins in self.groups.items()}
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
        self.head = _operand([model.head], transposed)
        self.final_norm = _norm(model.norm)
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
        """True for plain, int8 or packed bf16 Linear layers (not LoRA wrappers or sharded
        weights) and sdpa attention."""
        if model.training or any(type(p.data) is not torch.Tensor for p in model.parameters()):
            return False  # e.g. FSDP's DTensors: only the module's own forward gathers them
        for block in model.layers:
            if not isinstance(block.mlp, (SwiGLU, GeluMLP)) or block.attn.impl != "sdpa":
                return False
            if not all(_one_type(group) for group in _linear_groups(block).values()):
                return False
        return _one_type([model.head])

    def bind(self, model: Transformer) -> None:
        """Point the model's float parameters at the fused buffers (the tied embedding too)."""
        for layer in self.layers:
            layer.bind()
        self.head.bind([model.head])

    def applies(self, model: Transformer) -> bool:
        """Whether the model still computes what this step does: in eval mode, sdpa attention,
        and its layers still the ones fused (their weights not moved or cast since)."""
        first = self.layers[0]
        return (
            not model.training
            and first.qkv.holds(_linear_groups(model.layers[0])["qkv"])
            and self.head.holds([model.head])
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
        # this step's cache slot and the slots so far, as views taken once: (L, B, Hkv, [S,] hd)
        k_new, v_new = cache.k[:, :, :, slot], cache.v[:, :, :, slot]
        keys, values = cache.k[:, :, :, : slot + 1], cache.v[:, :, :, : slot + 1]
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(layer.attn_norm(x))  # (B, q + 2 kv)
            qk = qkv[:, :qk_dim].view(B, n_q + n_kv, hd)
            if self.rope:
                qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin)
            k_new[i].copy_(qk[:, n_q:])
            v_new[i].copy_(qkv[:, qk_dim:].view(B, n_kv, hd))
            # (B, Hkv, S, hd), read at the activations' precision as hidden() reads them
            k, v = keys[i].to(x.dtype), values[i].to(x.dtype)
            y = F.scaled_dot_product_attention(
                qk[:, :n_q, None], k, v, attn_mask=mask, enable_gqa=n_kv != n_q
            )  # (B, H, 1, hd)
            x = layer.wo(y.reshape(B, q_dim), residual=x)
            x = layer.down(self._activation(layer, layer.up(layer.mlp_norm(x))), residual=x)
        return self.head(self.final_norm(x))

    def _activation(self, layer: _Layer, up: Tensor) -> Tensor:
        """SwiGLU's silu(gate) * up, or GELU (tanh) of the up projection."""
        if layer.swiglu:
            return F.silu(up[:, : self.hidden_dim]).mul_(up[:, self.hidden_dim :])
        return F.gelu(up, approximate="tanh")
