"""Timed measurements on the device: matmul peak, memory bandwidth, training, prefill, decoding,
attention.

Every measurement warms up first, repeats, and reports the median; each workload runs inside
a PeakMemory block that starts before its model is built, so its peak includes the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from models import Transformer, math_attention
from models.attention import ATTENTION_IMPLS
from models.config import ModelConfig
from tformer_cli.device import DTYPES, matmul_peak_flops, ready_for_inference, sync
from tformer_cli.profiling.memory import PeakMemory
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


# Effort(warmup, min_reps, max_reps, budget_s, decode_steps, peak_seconds, bandwidth_mib,
#        long_call_s, slow_warmup_counts)
QUICK = Effort(1, 2, 3, 0.0, 12, 0.2, 128, 1.0, True)
FULL = Effort(1, 3, 10, 4.0, 32, 0.5, 256, 20.0)
WARM_UP = Effort(0, 1, 1, 0.0, 2, 0.0, 1)  # every workload once, on a small model


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


@dataclass(frozen=True)
class Bench:
    """A workload's setting: the model (its config, and how to build it), B x T tokens, the
    device and precision, and how hard to measure."""

    cfg: ModelConfig
    build: Builder
    seq_len: int
    batch_size: int
    device: torch.device
    precision: str
    effort: Effort
    quantize: str = "none"  # inference only: --quantize's scheme

    def at(self, seq_len: int) -> Bench:
        """The same setting at another context length."""
        return dataclasses.replace(self, seq_len=seq_len)

    def tokens(self, seed: int = 0) -> torch.Tensor:
        """Random token ids (B, T) on the device; the global RNG stays untouched."""
        gen = torch.Generator().manual_seed(seed)
        shape = (self.batch_size, self.seq_len)
        return torch.randint(0, self.cfg.vocab_size, shape, generator=gen).to(self.device)


# -- the device ------------------------------------------------------------------------------------


def measure_matmul_peak(device: torch.device, precision: str, effort: Effort) -> float:
    """Dense matmul FLOP/s at this precision: MFU's denominator, as the training run card has it."""
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
    bench = Bench(small, lambda: Transformer(small), 32, 1, device, precision, WARM_UP)
    measure_training(bench)
    measure_inference(bench)
    for impl in ATTENTION_IMPLS:
        measure_attention(bench, impl)


# -- workloads -------------------------------------------------------------------------------------


def measure_training(bench: Bench) -> dict[str, Any]:
    """One optimizer step as `tformer train` takes it: autocast forward, loss, backward, clip,
    AdamW."""
    with PeakMemory(bench.device) as mem:
        times = _time_training(bench, mem)
    step_s = statistics.median(times)
    return {
        "step_s": step_s,
        "tokens_per_s": bench.batch_size * bench.seq_len / step_s,
        "reps": len(times),
        "peak_memory_bytes": mem.peak,
        "memory_method": mem.method,
    }


def _time_training(bench: Bench, mem: PeakMemory) -> list[float]:
    # everything built here is freed on return, inside the caller's memory window
    device, precision = bench.device, bench.precision
    model = bench.build().to(device).train()
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    x, y = bench.tokens(seed=1), bench.tokens(seed=2)

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

    return time_runs(step, device, bench.effort, mem=mem)


def measure_inference(bench: Bench) -> dict[str, Any]:
    """Prefill, cached decoding and uncached decoding at context length T, as `tformer generate`
    runs them.

    The model is made ready as `tformer generate` makes it (ready_for_inference: quantized,
    packed or cast to the precision, fused for decoding). A cached step writes the last cache
    slots and reads all T; an uncached step runs the model over the whole T-token context to get
    one new token per row (what --no-cache does).
    """
    with PeakMemory(bench.device) as mem:
        prefill_times, no_cache_times, decode_times, fused = _time_inference(bench, mem)
    prefill_s, no_cache_s, decode_s = (
        statistics.median(t) for t in (prefill_times, no_cache_times, decode_times)
    )
    B = bench.batch_size
    return {
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": B * bench.seq_len / prefill_s,
        "decode_step_s": decode_s,
        "decode_tokens_per_s": B / decode_s,
        "decode_no_cache_step_s": no_cache_s,
        "decode_tokens_per_s_no_cache": B / no_cache_s,
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
    bench: Bench, mem: PeakMemory
) -> tuple[list[float], list[float], list[float], bool]:
    device, effort, T = bench.device, bench.effort, bench.seq_len
    model = ready_for_inference(bench.build(), device, bench.precision, bench.quantize)
    cache = model.new_cache(bench.batch_size, T)
    idx = bench.tokens()

    def prefill() -> torch.Tensor:
        return model.last_logits(idx, cache).argmax(-1)

    def no_cache_step() -> torch.Tensor:
        return model.last_logits(idx).argmax(-1)

    prefill_times = time_runs(prefill, device, effort, mem=mem)
    # prefill warmed the same kernels up; the uncached step is the same forward without the cache
    no_cache_times = time_runs(
        no_cache_step, device, effort, warmup=0, min_reps=min(effort.min_reps, len(prefill_times))
    )
    token = idx[:, -1:]

    def decode(slot: int) -> torch.Tensor:  # the step `tformer generate` takes
        return model.last_logits(token, cache, slot).argmax(-1, keepdim=True)

    # the last slots, each step reading (about) all T keys and values; rewriting them is harmless
    slots = list(range(max(0, T - effort.decode_steps), T))
    for slot in slots[-2:]:
        decode(slot)
    decode_times = []
    for slot in slots:
        start = time.perf_counter()
        token = decode(slot)
        sync(device)
        decode_times.append(time.perf_counter() - start)
    return prefill_times, no_cache_times, decode_times, model.fused_decoding


def measure_attention(bench: Bench, impl: str) -> dict[str, Any]:
    """One layer's attention, forward + backward: the fused kernel ("sdpa") or the explicit
    T x T path ("math")."""
    with PeakMemory(bench.device) as mem:
        times = _time_attention(bench, impl, mem)
    return {
        "seconds": statistics.median(times),
        "reps": len(times),
        "peak_memory_bytes": mem.peak,
        "memory_method": mem.method,
    }


def _time_attention(bench: Bench, impl: str, mem: PeakMemory) -> list[float]:
    cfg, device, dtype = bench.cfg, bench.device, DTYPES[bench.precision]
    B, T, H, Hkv, hd = bench.batch_size, bench.seq_len, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, T, hd, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(B, Hkv, T, hd, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(B, Hkv, T, hd, generator=gen).to(device, dtype).requires_grad_()
    grad = torch.ones(B, H, T, hd, device=device, dtype=dtype)

    def run() -> None:
        if impl == "math":
            y = math_attention(q, k, v, None, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
        y.backward(grad)
        q.grad = k.grad = v.grad = None

    return time_runs(run, device, bench.effort, mem=mem)
