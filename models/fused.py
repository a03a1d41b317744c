"""Training matmuls under autocast with fewer passes over memory: one matmul for layers that read
the same input, and the weights cast once per optimizer step.

Attention's q, k and v (and SwiGLU's gate and up) read the same input, so while training under
bf16 (or fp16) autocast they run as one matmul against their weights stacked side by side, cast
once and kept until the optimizer changes the weights, where autocast would cast every weight
and every input again at each use (each micro-batch, under --grad-accum). Each layer keeps its
own fp32 parameter: the master weight the optimizer updates and the checkpoint saves under its
usual name; the stacked copy is a cache, and the gradients are split back onto the masters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _StackedLinear(torch.autograd.Function):
    """y = x W^T + b for a stacked copy (W, b) of n layers' parameters; backward hands each layer
    its slice of the gradient, in the master's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, n, *masters):
        ctx.x_dtype = x.dtype
        x = x.to(weight.dtype)
        ctx.save_for_backward(x, weight)
        ctx.rows = [w.size(0) for w in masters[:n]]
        ctx.dtypes = [p.dtype for p in masters]
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        grad_x = (grad @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        flat = grad.reshape(-1, grad.size(-1))
        grad_w = flat.t() @ x.reshape(-1, x.size(-1))
        masters = list(grad_w.split(ctx.rows))
        if ctx.has_bias:
            masters += flat.sum(0, dtype=torch.float32).split(ctx.rows)
        masters = [g.to(dtype) for g, dtype in zip(masters, ctx.dtypes, strict=True)]
        return grad_x, None, None, None, *masters


def _compute_dtype(ref: Tensor) -> torch.dtype:
    """The dtype matmuls run in here: autocast's where it is on, else the weights' own."""
    device = ref.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return ref.dtype


def fusable(layers: Sequence[nn.Module]) -> bool:
    """Whether these layers can run as one stacked matmul: plain Linear layers (not LoRA-wrapped
    or quantized) with trainable weights, all with a bias or all without."""
    return (
        all(type(m) is nn.Linear for m in layers)
        and all(m.weight.requires_grad for m in layers)
        and len({m.bias is None for m in layers}) == 1
    )


def stacked_linear(x: Tensor, layers: Sequence[nn.Linear], owner: nn.Module) -> Tensor:
    """x through each of the layers, as one matmul: their outputs side by side on the last dim.

    The stacked (and cast) weights are cached on owner until release_weight_copies: call that
    whenever the weights change (training does, after every optimizer step).
    """
    masters = [m.weight for m in layers]
    biases = [m.bias for m in layers if m.bias is not None]
    if torch.compiler.is_compiling():  # a traced graph fuses the stacking and casting itself
        return F.linear(x, torch.cat(masters), torch.cat(biases) if biases else None)
    dtype = _compute_dtype(masters[0])
    copies = owner.__dict__.setdefault("_weight_copies", {})
    # In-place edits (load_state_dict, init) bump a tensor's version and so miss the cache; the
    # fused optimizers bump none, which is why training releases the copies after each step.
    slot = (dtype, *(id(m) for m in layers))
    key = tuple((id(p), p._version) for p in (*masters, *biases))
    if copies.get(slot, (None,))[0] != key:
        with torch.no_grad():
            weight = torch.cat(masters).to(dtype)
            bias = torch.cat(biases).to(dtype) if biases else None
        copies[slot] = (key, weight, bias)
    _, weight, bias = copies[slot]
    return _StackedLinear.apply(x, weight, bias, len(masters), *masters, *biases)


def release_weight_copies(model: nn.Module) -> None:
    """Drop every cached stacked copy in model: the next forward stacks the new weights."""
    for module in model.modules():
        module.__dict__.pop("_weight_copies", None)


def linears(x: Tensor, layers: Sequence[nn.Module], owner: nn.Module) -> list[Tensor]:
    """[layer(x) for layer in layers]; while owner trains under autocast (and the layers are
    fusable), through stacked_linear: one matmul, weights cast once per optimizer step.

    fp32 keeps the layers' own calls: stacked, its matmuls ran no faster on a CPU (724 vs 740 ms
    a step of `small`) and their sums would round differently from the unfused model's.
    """
    if (
        owner.training
        and torch.is_grad_enabled()
        and fusable(layers)
        and _compute_dtype(layers[0].weight) != layers[0].weight.dtype
    ):
        y = stacked_linear(x, layers, owner)
        return list(y.split([m.out_features for m in layers], dim=-1)) if len(layers) > 1 else [y]
    return [m(x) for m in layers]
