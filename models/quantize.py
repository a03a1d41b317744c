"""Weights in the layouts that fast CPU kernels read, made at load time: int8 and packed bf16.

`quantize_model(model, "int8")` (what `--quantize int8` does) and `quantize_model(model, "bf16")`
(what `--precision bf16` does on a CPU with bf16 hardware) replace every nn.Linear of the blocks
and the output head by a module holding its weight in the kernel's own packed layout. Embeddings
and norms stay fp32, and so does everything between the matmuls: the residual stream, the norms,
attention and the KV cache. A tied head gets its own packed copy, the embedding stays float.
The packed weights are made from the float weights in memory and are never written to disk.

- int8 (`Int8Linear`): symmetric per-output-channel int8 weights (scale = max|row| / 127), packed
  once for fbgemm's dynamic-quantization linear (`torch.ops.quantized.linear_dynamic`): each call
  quantizes its input to uint8 with one scale for the whole tensor, multiplies in int32 and
  rescales, the bias fused. Chosen by measurement on an AVX512 CPU, at batch 1 and 8 (see the
  README's "Generation speed"): faster than fp32 on every shape that matters (the 32000 x 288
  head 13x), while `torch._weight_int8pack_mm` with fp32 inputs was 5-30x slower than fbgemm,
  torchao's int8 configurations in eager mode slower than fp32, and oneDNN's qlinear 1.5-3x
  slower. torch marks its quantized-tensor API deprecated in favour of torchao
  (pytorch/pytorch#184982); `int8_available()` tells where the kernels are gone.
- bf16 (`Bf16Linear`): bf16 weights reordered once into oneDNN's blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight`) and multiplied by `torch.ops.mkldnn._linear_pointwise`
  with bf16 inputs and fp32 results. Plain `F.linear` on bf16 weights re-lays them out on every
  call and ran slower than fp32 at batch 1 for every layer shape; packed, `small` decodes 1.6x
  and `gpt2` 2.3x faster than in fp32. These two ops are private (inductor calls them when it
  freezes weights): where a torch build lacks them, `Bf16Linear` falls back to `F.linear`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCHEMES = ("none", "int8")  # what --quantize takes
FORMATS = ("int8", "bf16")  # the packed weight layouts quantize_model makes


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's deprecation warning on quantized tensors: users cannot act on it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        yield


def int8_available() -> bool:
    """Whether this torch build has fbgemm's int8 linear kernels (x86 CPUs)."""
    return (
        hasattr(torch.ops.quantized, "linear_dynamic")
        and "fbgemm" in torch.backends.quantized.supported_engines
    )


def packed_bf16_available() -> bool:
    """Whether this torch build has oneDNN's packed bf16 linear (the private ops of Bf16Linear)."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
        and bool(ops._is_mkldnn_bf16_supported())
    )


def int8_rows(weight: Tensor) -> Tensor:
    """weight (out, in) quantized per output row: symmetric qint8, scale = max|row| / 127."""
    w = weight.detach().float().contiguous()
    scale = (w.abs().amax(1) / 127.0).clamp(min=1e-12).double()
    zero = torch.zeros(w.size(0), dtype=torch.long)
    with _quiet():
        return torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)


def pack_int8(qweight: Tensor, bias: Tensor | None) -> torch.ScriptObject:
    """fbgemm's packed form of a per-channel qint8 weight (out, in), the fp32 bias fused in."""
    with _quiet():
        return torch.ops.quantized.linear_prepack(
            qweight, None if bias is None else bias.detach().float()
        )


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights (per-output-channel scales): fp32 in, fp32 out."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = pack_int8(int8_rows(linear.weight), linear.bias)

    def unpacked(self) -> tuple[Tensor, Tensor | None]:
        """The qint8 weight (out, in) and the fp32 bias, as packed (for fusing several layers)."""
        with _quiet():
            return torch.ops.quantized.linear_unpack(self.packed)

    def forward(self, x: Tensor) -> Tensor:
        # reduce_range=False: the full uint8 range for the input, which VNNI/AVX512 CPUs
        # multiply without overflow; about 1.5x smaller error than the 7-bit range
        return torch.ops.quantized.linear_dynamic(x, self.packed, False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def fuse_int8(layers: list[Int8Linear]) -> torch.ScriptObject:
    """One packed int8 matrix holding the rows of several layers (their own packed one for one).

    Rows keep their own scales, so the fused matmul computes exactly what the layers do.
    """
    if len(layers) == 1:
        return layers[0].packed
    parts = [layer.unpacked() for layer in layers]
    scales = torch.cat([w.q_per_channel_scales() for w, _ in parts])
    with _quiet():
        weight = torch.quantize_per_channel(
            torch.cat([w.dequantize() for w, _ in parts]),
            scales,
            torch.zeros(scales.numel(), dtype=torch.long),
            0,
            torch.qint8,
        )
    bias = None
    if any(b is not None for _, b in parts):
        bias = torch.cat([b for _, b in parts])
    return pack_int8(weight, bias)


def pack_bf16(weight: Tensor) -> Tensor:
    """weight (out, in) as bf16, in oneDNN's blocked layout where the packed ops exist."""
    w = weight.detach().to(torch.bfloat16).contiguous()
    if not packed_bf16_available():
        return w
    return torch.ops.mkldnn._reorder_linear_weight(w)


def bf16_matmul(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., in) in bf16 times a pack_bf16 weight, + bias: (..., out) in bf16."""
    if packed.layout == torch._mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, packed, bias)


class Bf16Linear(nn.Module):
    """A Linear layer with packed bf16 weights: fp32 in, fp32 out."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = pack_bf16(linear.weight)
        self.bias_bf16 = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def unpacked(self) -> Tensor:
        """The bf16 weight (out, in) in the plain layout (for fusing several layers)."""
        return self.packed.to_dense() if self.packed.layout == torch._mkldnn else self.packed

    def forward(self, x: Tensor) -> Tensor:
        return bf16_matmul(x.to(torch.bfloat16), self.packed, self.bias_bf16).float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed bf16"


def fuse_bf16(layers: list[Bf16Linear]) -> tuple[Tensor, Tensor | None]:
    """One packed bf16 matrix holding the rows of several layers, and their bias."""
    bias = None
    if any(layer.bias_bf16 is not None for layer in layers):
        bias = torch.cat([layer.bias_bf16 for layer in layers])
    if len(layers) == 1:
        return layers[0].packed, bias
    return pack_bf16(torch.cat([layer.unpacked() for layer in layers])), bias


MODULES: dict[str, type[nn.Module]] = {"int8": Int8Linear, "bf16": Bf16Linear}


def _linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, layer) for every nn.Linear of the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                yield parent, name, child


def quantize_model(model: nn.Module, scheme: str) -> nn.Module:
    """The model (changed in place, on the CPU) with each nn.Linear replaced by scheme's packed
    module: "int8" or "bf16" (FORMATS); "none" returns it as it is.

    Call it before prepare_for_inference (which fuses the packed layers for one-token steps);
    the model is then for inference only. Norms and embeddings are made fp32.
    """
    if scheme not in ("none", *FORMATS):
        choices = ", ".join(("none", *FORMATS))
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {choices}")
    if scheme == "none":
        return model
    if next(model.parameters()).device.type != "cpu":
        raise ValueError(f"{scheme} weights are packed for CPU kernels; move the model to the CPU")
    if scheme == "int8" and not int8_available():
        raise ValueError("this torch build has no fbgemm int8 kernels (they are x86-only)")
    model.float().eval()  # the float parts (embeddings, norms) and thus the activations in fp32
    module = MODULES[scheme]
    for parent, name, linear in list(_linears(model)):
        setattr(parent, name, module(linear))
    if hasattr(model, "decode_step"):
        model.decode_step = None  # a step prepared before would hold the float weights
    return model
