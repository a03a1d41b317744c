"""Which device and precision to run on, and what this machine is good at."""

from __future__ import annotations

import os
import platform
from functools import lru_cache

import torch

from models import Transformer
from models.quantize import packed_bf16_available, quantize_model
from tformer_cli.errors import TformerError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for --device: auto picks CUDA, then MPS, then the CPU."""
    if name not in DEVICES:
        raise TformerError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TformerError("--device cuda: no CUDA device is available here; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise TformerError("--device mps: MPS is not available here; use --device cpu")
    return torch.device(name)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_features() -> list[str]:
    """The vector extensions that matter for speed here, as /proc/cpuinfo names them."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    return [f for f in wanted if f in cpu_flags()]


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def packs_bf16(device: torch.device) -> bool:
    """Whether bf16 inference on device runs packed bf16 weights with fp32 activations (a CPU
    with bf16 hardware and oneDNN's packed linear), rather than a model cast to bf16."""
    return device.type == "cpu" and cpu_has_fast_bf16() and packed_bf16_available()


def inference_weights(
    device: torch.device, precision: str, quantize: str = "none", compile: bool = False
) -> str:
    """The form the matmul weights take for inference (models.quantize.quantize_model's scheme):
    "int8" for --quantize int8; "bf16", packed, for bf16 where packs_bf16 (but not with
    --compile: torch.compile cannot trace packed weights); else "none": the model's own Linear
    layers, cast to the precision."""
    if quantize != "none":
        return quantize
    return "bf16" if precision == "bf16" and packs_bf16(device) and not compile else "none"


def load_dtype(weights: str, precision: str) -> torch.dtype:
    """What a model's weights are read as for inference: fp32 when they are to be quantized or
    packed (inference_weights), else the precision."""
    return torch.float32 if weights != "none" else DTYPES[precision]


def ready_for_inference(
    model: Transformer,
    device: torch.device,
    precision: str,
    quantize: str = "none",
    compile: bool = False,
) -> Transformer:
    """The model on device as the commands generate with it: int8 weights (quantize), packed
    bf16 weights (bf16 where packs_bf16), or cast to the precision; then prepared for fast
    decoding (and compiled prefill with compile=True)."""
    weights = inference_weights(device, precision, quantize, compile)
    model = model.to(device=device, dtype=load_dtype(weights, precision)).eval()
    return quantize_model(model, weights).prepare_for_inference(compile=compile)


JOBS = ("train", "inference")
# Below this many parameters a model's weights sit in cache and decoding is bound by per-op
# overhead: packed bf16 decoded slower than fp32 there (`micro` 139 vs 245 tokens/s, `tiny`
# even, `small` at vocab 4096, 7.2M parameters, 1.25x faster), so auto keeps such models fp32.
PACKED_BF16_MIN_PARAMS = 6_000_000


def auto_precision_for_model(device: torch.device, params: int) -> str:
    """What auto picks for inference of a model of this many parameters on device."""
    picked = auto_precision(device, "inference")[0]
    if picked == "bf16" and device.type == "cpu" and params < PACKED_BF16_MIN_PARAMS:
        return "fp32"
    return picked


def auto_precision(device: torch.device, job: str) -> tuple[str, str]:
    """(precision, why) that --precision auto picks for a job ("train" or "inference") on a device.

    A fixed rule by device and CPU features, from measurements taken once by the benchmarks
    (benchmarks/precision_auto.py), so the same machine always computes the same numbers:
    - CUDA: bf16 where the GPU has it, else fp16, for both jobs.
    - CPU, training: bf16 autocast where the CPU multiplies bf16 in hardware (AVX512-BF16 or
      AMX; measured 1.45x the fp32 step on `small`), else fp32.
    - CPU, inference: bf16 where the CPU multiplies bf16 in hardware and torch has oneDNN's
      packed linear (packs_bf16), for models of PACKED_BF16_MIN_PARAMS or more (see
      auto_precision_for_model): packed bf16 weights with fp32 activations decoded `small` 1.5x
      and `gpt2` 2.2x faster than fp32 at batch 1, and 2-4x at batch 8, on an AVX512-BF16 CPU
      (benchmarks/decode_vs_llamacpp.py). Else fp32: a model cast to bf16 decodes no faster
      than fp32 (conversions and small ops), and without bf16 hardware far slower.
    - MPS and anything else: fp32.
    """
    if job not in JOBS:
        raise ValueError(f"job must be one of {JOBS}, got {job!r}")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "the GPU runs bf16 natively"
        return "fp16", "the GPU has no bf16; fp16 with loss scaling"
    if device.type == "cpu" and job == "train":
        if cpu_has_fast_bf16():
            return (
                "bf16",
                "this CPU multiplies bf16 in hardware (AVX512-BF16/AMX): "
                "bf16 autocast trains ~1.45x faster",
            )
        return "fp32", "this CPU has no bf16 matrix instructions: bf16 would be slower than fp32"
    if device.type == "cpu" and packs_bf16(device):
        return (
            "bf16",
            "this CPU multiplies bf16 in hardware (AVX512-BF16/AMX): packed bf16 weights with "
            "fp32 activations decode 1.5-2.2x faster than fp32 (models of "
            f"{PACKED_BF16_MIN_PARAMS // 1_000_000}M+ parameters; smaller ones stay fp32)",
        )
    if device.type == "cpu":
        return "fp32", "this CPU has no bf16 matrix instructions: fp32 decodes fastest"
    return "fp32", f"the safe choice on {device.type}"


def resolve_precision(name: str, device: torch.device, job: str = "train") -> str:
    """fp32, bf16 or fp16 for --precision; auto picks the fastest correct one for the device and
    the job."""
    if name not in PRECISIONS:
        raise TformerError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        return auto_precision(device, job)[0]
    if name == "fp16" and device.type == "cpu":
        raise TformerError("--precision fp16 is for GPUs; on the CPU use bf16 or fp32")
    return name


def machine_info() -> dict[str, object]:
    """Versions, devices and threads: what `tformer info` shows."""
    from tformer_cli import __version__

    info: dict[str, object] = {
        "tformer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_features": " ".join(cpu_features()) or "unknown",
        "cpu_bf16_fast": cpu_has_fast_bf16(),
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "default_device": str(resolve_device("auto")),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_bf16"] = torch.cuda.is_bf16_supported()
    device = resolve_device("auto")
    for job in JOBS:
        precision, why = auto_precision(device, job)
        info[f"auto_precision_{job}"] = precision
        info[f"auto_precision_{job}_why"] = why
    return info


def sync(device: torch.device) -> None:
    """Wait for queued work on the device, so timings and memory figures are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_peak_flops(device: torch.device, precision: str = "fp32", seconds: float = 0.3) -> float:
    """Measured dense matmul throughput (FLOP/s) of this device at this precision: MFU's
    denominator."""
    import time

    dtype = DTYPES[precision]
    size = 4096 if device.type == "cuda" else 1024
    gen = torch.Generator().manual_seed(0)  # leave the global RNG (training's dropout stream) alone
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    a @ b  # warm up
    sync(device)
    n, start = 0, time.perf_counter()
    while True:
        a @ b
        n += 1
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or n >= 1000:
            return 2 * size**3 * n / elapsed
