"""Timed measurements on the device: matmul peak, memory bandwidth, training, prefill, decoding, attention.

Every measurement warms up first, repeats, and reports the median; each workload runs inside
a PeakMemory block that starts before its model is built, so its peak includes the weights.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from models import Transformer, math_attention
from models.config import ModelConfig
from models.decode import decode_step_for, prepare_for_inference
from tformer_cli.device import DTYPES, matmul_peak_flops
from tformer_cli.profiling.memory import PeakMemory, sync
from tformer_cli.training.loss import lm_loss
from tformer_cli.training.optim import build_optimizer

Builder = Callable[[], Transformer]


@dataclass(frozen=True)
class Effort:
    """How hard to measure: warm-up calls, repetitions, and the time one measurement may take."""

    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float  # past min_reps, stop repeating once a measurement has run this long
    decode_steps: int
    peak_seconds: float
    bandwidth_mib: int
    # a warm-up call slower than long_call_s gets one timed repetition after it, or with
    # slow_warmup_counts none: a call that long is dominated by its work, not by first-call costs
    long_call_s: float = float("inf")
    slow_warmup_counts: bool = False


QUICK = Effort(
    warmup=1,
    min_reps=2,
    max_reps=3,
    budget_s=0.0,
    decode_steps=12,
    peak_seconds=0.2,
    bandwidth_mib=128,
    long_call_s=1.0,
    slow_warmup_counts=True,
)
FULL = Effort(
    warmup=1,
    min_reps=3,
    max_reps=10,
    budget_s=4.0,
    decode_steps=32,
    peak_seconds=0.5,
    bandwidth_mib=256,
    long_call_s=20.0,
)


def time_runs(
    fn: Callable[[], Any],
    device: torch.device,
    effort: Effort,
    warmup: int | None = None,
    min_reps: int | None = None,
    mem: PeakMemory | None = None,
) -> list[float]:
    """Seconds of each timed call of fn, after the warm-up calls (whose peak memory mem forgets)."""
    least = effort.min_reps if min_reps is None else min_reps
    for _ in range(effort.warmup if warmup is None else warmup):
        start = time.perf_counter()
        fn()
        sync(device)
        took = time.perf_counter() - start
        if took > effort.long_call_s:
            if effort.slow_warmup_counts:
                return [took]
            least = 1
    if mem is not None:
        mem.restart()
    times: list[float] = []
    spent = 0.0
    while len(times) < least or (spent < effort.budget_s and len(times) < effort.max_reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return times


def _random_tokens(
    cfg: ModelConfig, batch_size: int, seq_len: int, device: torch.device, seed: int = 0
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)  # the global RNG stays untouched
    return torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen).to(device)


# -- the device ------------------------------------------------------------------------------------


def measure_matmul_peak(device: torch.device, precision: str, effort: Effort) -> float:
    """Dense matmul FLOP/s at this precision: the MFU denominator, as the training run card measures it."""
    return matmul_peak_flops(device, precision, seconds=effort.peak_seconds)


def measure_bandwidth(device: torch.device, effort: Effort) -> float:
    """Memory bandwidth in bytes/s from a large copy (read + write), sized well past the caches."""
    n = effort.bandwidth_mib * 2**20 // 4 * (4 if device.type == "cuda" else 1)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = time_runs(
        lambda: dst.copy_(src), device, effort, warmup=1, min_reps=max(3, effort.min_reps)
    )
    return 2 * src.nbytes / statistics.median(times)


def warm_up(cfg: ModelConfig, device: torch.device, precision: str) -> None:
    """Run every workload once on a one-layer, short-context copy of the model.

    Kernels, thread pools and library code get loaded now, so the memory measured later is
    the workload's and not the runtime's first-use cost.
    """
    small = cfg.replace(
        n_layers=1, vocab_size=min(cfg.vocab_size, 512), max_seq_len=max(cfg.max_seq_len, 32)
    )
    effort = Effort(
        warmup=0,
        min_reps=1,
        max_reps=1,
        budget_s=0.0,
        decode_steps=2,
        peak_seconds=0.0,
        bandwidth_mib=1,
    )

    def build() -> Transformer:
        return Transformer(small)

    measure_training(small, build, 32, 1, device, precision, effort)
    measure_inference(small, build, 32, 1, device, precision, effort)
    for impl in ("sdpa", "math"):
        measure_attention(small, 32, 1, device, precision, impl, effort)


# -- workloads ---------------------------------------------------------------------------------------


def measure_training(
    cfg: ModelConfig,
    build: Builder,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    effort: Effort,
) -> dict[str, Any]:
    """One optimizer step as `tformer train` takes it: autocast forward, loss, backward, clip, AdamW."""
    with PeakMemory(device) as mem:
        times = _time_training(cfg, build, seq_len, batch_size, device, precision, effort, mem)
    step_s = statistics.median(times)
    return {
        "step_s": step_s,
        "tokens_per_s": batch_size * seq_len / step_s,
        "reps": len(times),
        "peak_memory_bytes": mem.peak,
        "memory_method": mem.method,
    }


def _time_training(
    cfg: ModelConfig,
    build: Builder,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    effort: Effort,
    mem: PeakMemory,
) -> list[float]:
    # everything built here is freed on return, inside the caller's memory window
    model = build().to(device).train()
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    x = _random_tokens(cfg, batch_size, seq_len, device, seed=1)
    y = _random_tokens(cfg, batch_size, seq_len, device, seed=2)

    def step() -> None:
        amp = (
            torch.autocast(device.type, dtype=DTYPES[precision])
            if precision != "fp32"
            else contextlib.nullcontext()
        )
        with amp:
            loss = lm_loss(model, x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return time_runs(step, device, effort, mem=mem)


def measure_inference(
    cfg: ModelConfig,
    build: Builder,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    effort: Effort,
) -> dict[str, Any]:
    """Prefill, cached decoding and uncached decoding at context length T, as `tformer generate` runs them.

    Weights are cast to the precision and fused for decoding (prepare_for_inference). A cached
    step writes the last cache slots and reads all T; an uncached step runs the model over the
    whole T-token context to get one new token per row (what --no-cache does).
    """
    with PeakMemory(device) as mem:
        prefill_times, no_cache_times, decode_times, fused = _time_inference(
            cfg, build, seq_len, batch_size, device, precision, effort, mem
        )
    prefill_s, no_cache_s, decode_s = (
        statistics.median(t) for t in (prefill_times, no_cache_times, decode_times)
    )
    return {
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": batch_size * seq_len / prefill_s,
        "decode_step_s": decode_s,
        "decode_tokens_per_s": batch_size / decode_s,
        "decode_no_cache_step_s": no_cache_s,
        "decode_tokens_per_s_no_cache": batch_size / no_cache_s,
        "decode_fused": fused,
        "reps": {
            "prefill": len(prefill_times),
            "decode": len(decode_times),
            "no_cache": len(no_cache_times),
        },
        "peak_memory_bytes": mem.peak,
        "memory_method": mem.method,
    }


@torch.inference_mode()
def _time_inference(
    cfg: ModelConfig,
    build: Builder,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    effort: Effort,
    mem: PeakMemory,
) -> tuple[list[float], list[float], list[float], bool]:
    model = prepare_for_inference(build().to(device=device, dtype=DTYPES[precision]).eval())
    cache = model.new_cache(batch_size, seq_len)
    idx = _random_tokens(cfg, batch_size, seq_len, device)

    def prefill() -> torch.Tensor:
        h = model.hidden(idx, cache=cache, start=0)
        return model.head(h[:, -1]).argmax(-1)

    def no_cache_step() -> torch.Tensor:
        return model.head(model.hidden(idx)[:, -1]).argmax(-1)

    prefill_times = time_runs(prefill, device, effort, mem=mem)
    # prefill warmed the same kernels up; the uncached step is the same forward without the cache
    no_cache_times = time_runs(
        no_cache_step, device, effort, warmup=0, min_reps=min(effort.min_reps, len(prefill_times))
    )

    step_fn = decode_step_for(model)
    token = idx[:, -1]

    def decode(slot: int) -> torch.Tensor:
        if step_fn is not None:  # the fused step `tformer generate` uses
            return step_fn(token, cache, slot, slot).argmax(-1)
        h = model.hidden(token[:, None], cache=cache, start=slot)
        return model.head(h[:, -1]).argmax(-1)

    # the last slots, each step reading (about) all T keys and values; rewriting them is harmless
    slots = list(range(max(0, seq_len - effort.decode_steps), seq_len))
    for slot in slots[-2:]:
        decode(slot)
    decode_times = []
    for slot in slots:
        start = time.perf_counter()
        token = decode(slot)
        sync(device)
        decode_times.append(time.perf_counter() - start)
    return prefill_times, no_cache_times, decode_times, step_fn is not None


def measure_attention(
    cfg: ModelConfig,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    impl: str,
    effort: Effort,
) -> dict[str, Any]:
    """One layer's attention, forward + backward, with the fused kernel ("sdpa") or the explicit T x T path ("math")."""
    with PeakMemory(device) as mem:
        times = _time_attention(cfg, seq_len, batch_size, device, precision, impl, effort, mem)
    return {
        "seconds": statistics.median(times),
        "reps": len(times),
        "peak_memory_bytes": mem.peak,
        "memory_method": mem.method,
    }


def _time_attention(
    cfg: ModelConfig,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    impl: str,
    effort: Effort,
    mem: PeakMemory,
) -> list[float]:
    dtype = DTYPES[precision]
    gen = torch.Generator().manual_seed(3)
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = torch.randn(batch_size, H, seq_len, hd, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(batch_size, Hkv, seq_len, hd, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(batch_size, Hkv, seq_len, hd, generator=gen).to(device, dtype).requires_grad_()
    grad = torch.ones(batch_size, H, seq_len, hd, device=device, dtype=dtype)

    def run() -> None:
        if impl == "math":
            y = math_attention(q, k, v, None, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
        y.backward(grad)
        q.grad = k.grad = v.grad = None

    return time_runs(run, device, effort, mem=mem)
