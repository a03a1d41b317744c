"""One decoding step, one new token per row, through the KV cache: the engine's hot loop.

The same math as `Transformer.hidden` at a single cached position, in a fraction of the ops:
the q/k/v matrices and SwiGLU's gate/up matrices are fused into one matmul each, the residual
adds ride on `addmm`, and RoPE is one `addcmul`. Decoding a small model on a CPU is bound by
per-op overhead and by reading the weights once per token, so both matter.

Weights are kept as the right operand of `x @ W`. On the CPU in fp32 they are stored
transposed, (in, out) contiguous: MKL's matrix-vector product reads that layout 2-3x as fast
for the 32000 x 288 head as the (out, in) layout nn.Linear keeps (bf16 wants the opposite).
`prepare_for_inference` builds these fused buffers once and points the model's own parameters
at slices of them, so prefill and decoding share one copy of the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import KVCache, Transformer
from models.layers import GeluMLP, RMSNorm, SwiGLU

_ATTR = "_tformer_decode_step"


def _transposed_layout(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether weights should be stored (in, out): fp32 on the CPU; elsewhere nn.Linear's layout wins."""
    return device.type == "cpu" and dtype == torch.float32


class _Operand:
    """A fused weight matrix as the right operand of x @ W, with its optional bias."""

    def __init__(
        self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], transposed: bool
    ):
        stacked = (
            torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
        )
        # (out, in) rows stacked; kept as (in, out) contiguous or as a transposed view of the rows
        self.storage = stacked.t().contiguous() if transposed else stacked.contiguous()
        self.w = self.storage if transposed else self.storage.t()  # (in, out) either way
        self.transposed = transposed
        self.bias = None
        if any(b is not None for b in biases):
            self.bias = torch.cat([b.detach() for b in biases]).contiguous()

    def rows(self, start: int, end: int) -> torch.Tensor:
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

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W (+ bias) (+ residual)."""
        if self.bias is None:
            return x @ self.w if residual is None else torch.addmm(residual, x, self.w)
        y = torch.addmm(self.bias, x, self.w)
        return y if residual is None else residual + y


class _Layer:
    def __init__(self, block: nn.Module, transposed: bool):
        attn, mlp = block.attn, block.mlp
        self.attn_norm, self.mlp_norm = block.attn_norm, block.mlp_norm
        self.swiglu = isinstance(mlp, SwiGLU)
        self.groups = {
            "qkv": [attn.wq, attn.wk, attn.wv],
            "wo": [attn.wo],
            "up": [mlp.w1, mlp.w3] if self.swiglu else [mlp.w1],
            "down": [mlp.w2],
        }
        ops = {
            name: _Operand([m.weight for m in lins], [m.bias for m in lins], transposed)
            for name, lins in self.groups.items()
        }
        self.qkv, self.wo, self.up, self.down = ops["qkv"], ops["wo"], ops["up"], ops["down"]

    def bind(self) -> None:
        for name, lins in self.groups.items():
            getattr(self, name).bind(lins)


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's norm, computed exactly as models.layers does."""
    if isinstance(module, RMSNorm):
        return F.rms_norm(x.float(), (x.size(-1),), eps=module.eps).type_as(x) * module.weight
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


class DecodeStep:
    """Logits (B, V) for one new token per row, written into the cache at one slot."""

    def __init__(self, model: Transformer):
        ref = model.tok_emb.weight
        transposed = _transposed_layout(ref.dtype, ref.device)
        cfg = self.config = model.config
        self.model = model
        self.layers = [_Layer(block, transposed) for block in model.layers]
        self.head = _Operand([model.head.weight], [None], transposed)
        self.q_dim, self.kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.hidden_dim = cfg.hidden_dim
        self.gqa = cfg.n_kv_heads != cfg.n_heads
        if cfg.pos == "rope":
            # rotate_half(x) * sin == roll(x, hd/2) * [-sin | sin]: one addcmul instead of five ops
            half = cfg.head_dim // 2
            sign = torch.ones(cfg.head_dim, dtype=model.rope_sin.dtype, device=ref.device)
            sign[:half] = -1
            self.cos, self.sin = model.rope_cos.to(ref.dtype), (model.rope_sin * sign).to(ref.dtype)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """True for a plain Transformer in eval mode (no LoRA wrappers or sharded weights, fused attention)."""
        if not isinstance(model, Transformer) or model.training:
            return False
        if any(type(p.data) is not torch.Tensor for p in model.parameters()):
            return False  # e.g. FSDP's DTensors: only the module's own forward knows how to gather them
        for block in model.layers:
            linears = [
                block.attn.wq,
                block.attn.wk,
                block.attn.wv,
                block.attn.wo,
                block.mlp.w1,
                block.mlp.w2,
            ]
            if isinstance(block.mlp, SwiGLU):
                linears.append(block.mlp.w3)
            elif not isinstance(block.mlp, GeluMLP):
                return False
            if any(type(m) is not nn.Linear for m in linears) or block.attn.impl != "sdpa":
                return False
            if not all(
                isinstance(n, (RMSNorm, nn.LayerNorm)) for n in (block.attn_norm, block.mlp_norm)
            ):
                return False
        return type(model.head) is nn.Linear and isinstance(model.norm, (RMSNorm, nn.LayerNorm))

    def _shares_weights(self) -> bool:
        """Whether the model's parameters still live in this step's fused buffers."""
        m = self.model
        return (
            m.layers[0].attn.wq.weight.data_ptr() == self.layers[0].qkv.storage.data_ptr()
            and m.head.weight.data_ptr() == self.head.storage.data_ptr()
            and m.head.weight.dtype == self.head.storage.dtype
        )

    def __call__(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        slot: int,
        positions: torch.Tensor | int,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B,) at cache slot `slot`, position `positions` (int or (B,)); key_mask (B, S) marks real slots."""
        B = tokens.size(0)
        model, cfg = self.model, self.config
        x = F.embedding(tokens, model.tok_emb.weight)  # (B, d)
        if cfg.pos == "learned":
            x = x + model.pos_emb.weight[positions]
        elif cfg.pos == "sinusoidal":
            x = x + model.pos_table[positions].to(x.dtype)
        else:
            cos, sin = self.cos[positions], self.sin[positions]  # (hd,) or (B, hd)
            if cos.dim() == 2:
                cos, sin = cos[:, None], sin[:, None]
        n_q, n_kv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qk_dim = self.q_dim + self.kv_dim
        mask = None if key_mask is None else key_mask[:, None, None, : slot + 1]
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(_norm(layer.attn_norm, x))  # (B, q + 2 kv)
            qk = qkv[:, :qk_dim].view(B, n_q + n_kv, hd)
            if cfg.pos == "rope":
                qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin)
            cache.k[i, :, :, slot] = qk[:, n_q:]
            cache.v[i, :, :, slot] = qkv[:, qk_dim:].view(B, n_kv, hd)
            k, v = cache.k[i, :, :, : slot + 1], cache.v[i, :, :, : slot + 1]
            y = F.scaled_dot_product_attention(
                qk[:, :n_q, None].to(k.dtype), k, v, attn_mask=mask, enable_gqa=self.gqa
            )  # (B, H, 1, hd)
            x = layer.wo(y.reshape(B, self.q_dim).to(x.dtype), residual=x)
            up = layer.up(_norm(layer.mlp_norm, x))
            if layer.swiglu:
                act = F.silu(up[:, : self.hidden_dim]) * up[:, self.hidden_dim :]
            else:
                act = F.gelu(up, approximate="tanh")
            x = layer.down(act, residual=x)
        return self.head(_norm(model.norm, x))


def prepare_for_inference(model: Transformer) -> Transformer:
    """Fuse and lay out the weights for fast decoding, sharing them with the model. Call after .to().

    The model computes the same function (to float rounding); only where its parameters live in
    memory changes, so a prepared model is for inference (training would train views of fused
    buffers). Moving it to another device or dtype afterwards undoes the sharing: prepare again.
    """
    model.eval()
    if not DecodeStep.supports(model):
        return model
    with torch.no_grad():
        step = DecodeStep(model)
        for layer in step.layers:
            layer.bind()
        step.head.bind([model.head])  # the token embedding too, when tied
    setattr(model, _ATTR, step)
    return model


def decode_step_for(model: nn.Module) -> DecodeStep | None:
    """The prepared step of a model, a fresh one (with its own fused copy of the weights), or None."""
    step = getattr(model, _ATTR, None)
    if step is not None and not model.training and step._shares_weights():
        return step
    return DecodeStep(model) if DecodeStep.supports(model) else None
