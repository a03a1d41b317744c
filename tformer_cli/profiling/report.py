"""One model's profile on one device: analytic figures and measurements, as one JSON-ready dict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from models.attention import ATTENTION_IMPLS
from models.config import ModelConfig
from models.flops import matmul_params
from tformer_cli import __version__
from tformer_cli.device import cpu_has_fast_bf16, inference_weights
from tformer_cli.profiling import analytic, measure
from tformer_cli.profiling.fit import HEADROOM, will_it_fit
from tformer_cli.profiling.memory import available_memory, device_name
from tformer_cli.profiling.quantized import quantization_quality
from tformer_cli.profiling.source import ModelSource
from tformer_cli.units import human_bytes

_OOM = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))
# the CPU allocator reports a failed allocation as a plain RuntimeError
_CPU_OOM = "can't allocate memory"
# a measurement that would run longer than this (at the measured matmul peak, a lower bound)
# is skipped with the reason, rather than leaving the user waiting
TIME_CAP_S = {"quick": 30.0, "full": 180.0}
# --quick leaves out the math attention path once its T x T matrices pass this: it is memory-bound
# and runs an order of magnitude below the matmul peak, so the time cap cannot foresee it
QUICK_MATH_BYTES = 1 << 30


def _noop(message: str) -> None:
    pass


class _Runner:
    """Runs measurements that fit in memory and time; records why the others were skipped."""

    def __init__(
        self,
        device: torch.device,
        effort: measure.Effort,
        time_cap: float,
        on_progress: Callable[[str], None],
    ):
        self.device, self.effort, self.time_cap = device, effort, time_cap
        self.on_progress = on_progress
        self.skipped: list[dict[str, str]] = []
        self.peak_flops: float | None = None

    def run(
        self, what: str, need_bytes: int, flops: float, fn: Callable[[], dict[str, Any]]
    ) -> dict[str, Any] | None:
        """fn(), or None (the reason recorded) when it would not fit, take too long, or ran out
        of memory."""
        reason = self._too_big(need_bytes) or self._too_slow(flops)
        if reason:
            return self.skip(what, reason)
        self.on_progress(what)
        try:
            return fn()
        except _OOM:
            return self.skip(what, "ran out of memory on the device")
        except RuntimeError as e:
            if _CPU_OOM not in str(e):
                raise
            return self.skip(what, "ran out of memory on the device")

    def _too_big(self, need_bytes: int) -> str | None:
        free = available_memory(self.device)
        if free is not None and need_bytes > free * HEADROOM:
            return (
                f"needs ~{human_bytes(need_bytes)} by the analytic model, "
                f"{human_bytes(free)} is free"
            )
        return None

    def _too_slow(self, flops: float) -> str | None:
        """Why a measurement of this many FLOPs per call would pass the time cap, if it would."""
        if not self.peak_flops:
            return None
        effort = self.effort
        per_call = flops / self.peak_flops
        slow = per_call > effort.long_call_s
        if slow and effort.slow_warmup_counts:
            calls = 1
        else:
            calls = effort.warmup + (1 if slow else effort.min_reps)
        at_least = per_call * calls
        if at_least <= self.time_cap:
            return None
        advice = (
            "run without --quick or pick a smaller T"
            if effort.slow_warmup_counts
            else "pick a smaller T"
        )
        return (
            f"would take over {at_least:.0f} s even at the measured matmul peak "
            f"(the cap is {self.time_cap:.0f} s; {advice})"
        )

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append({"what": what, "reason": reason})
        return None


def analytic_figures(
    cfg: ModelConfig, seq_len: int, batch_size: int, precision: str, weights: str = "none"
) -> dict[str, Any]:
    """Everything the config alone says about cost at (B, T): parameters, FLOPs, memory (the
    inference figures with the matmul weights in the form weights names, see
    analytic.inference_memory)."""
    b = analytic.bytes_per_element(precision)
    counts = cfg.param_counts()
    split = analytic.flop_split(cfg, seq_len)
    tokens = seq_len * batch_size
    kv = analytic.kv_cache_bytes(cfg, seq_len, batch_size, b)
    kv_mha = analytic.kv_cache_bytes(cfg, seq_len, batch_size, b, kv_heads=cfg.n_heads)
    return {
        "params": cfg.num_params(),
        "params_by_component": counts,
        "param_bytes": cfg.num_params() * b,
        "matmul_params": matmul_params(cfg),
        "flops_per_token": split.training,
        "flops_per_token_forward": split.forward,
        "flops_per_step": split.training * tokens,
        "flops_per_step_forward": split.forward * tokens,
        "flops_forward_per_token": {
            "attention_proj": split.attention_proj,
            "attention_scores": split.attention_scores,
            "attention": split.attention,
            "mlp": split.mlp,
            "head": split.head,
        },
        "six_n_flops_per_token": analytic.six_n(cfg),
        "attention_flops_share": split.attention_share,
        "attention_crossover_seq_len": analytic.attention_crossover(cfg),
        "kv_cache_bytes": kv,
        "kv_cache_bytes_mha": kv_mha,
        "kv_cache_gqa_saving": kv_mha / kv,
        "kv_cache_bytes_per_token": kv // tokens,
        "train_memory": analytic.training_memory(cfg, seq_len, batch_size, precision),
        "train_memory_math": analytic.training_memory(cfg, seq_len, batch_size, precision, "math"),
        "inference_memory": analytic.inference_memory(cfg, seq_len, batch_size, precision, weights),
        "decode_bytes_per_step": analytic.decode_bytes_per_step(
            cfg, seq_len, batch_size, precision, weights
        ),
    }


def profile(
    source: ModelSource,
    seq_lens: list[int],
    batch_size: int,
    device: torch.device,
    precision: str,
    quick: bool = False,
    run_measurements: bool = True,
    on_progress: Callable[[str], None] = _noop,
    quantize: str = "none",
) -> dict[str, Any]:
    """Profile source's model at each context length (measured in full at the largest) on device;
    inference with the weights quantized by quantize, and then side by side with fp32."""
    cfg = source.config
    seq_lens = sorted(set(seq_lens))
    T = seq_lens[-1]
    effort = measure.QUICK if quick else measure.FULL
    free = available_memory(device)
    weights = inference_weights(device, precision, quantize)
    report: dict[str, Any] = {
        "tformer_version": __version__,
        "model": {"source": source.kind, "label": source.label, "config": cfg.to_dict()},
        "preset": source.preset,  # the preset's name, or None for a run or a config file
        "default_preset": source.default,  # no model was named: the default of `tformer train`
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "precision": precision,
        **({"quantize": quantize} if quantize != "none" else {}),
        "bytes_per_element": analytic.bytes_per_element(precision),
        "batch_size": batch_size,
        "seq_len": T,
        "seq_lens": seq_lens,
        "quick": quick,
        **analytic_figures(cfg, T, batch_size, precision, weights),
        "checkpoint_params": source.checkpoint_params,
        "free_memory_bytes": free,
        "fit": will_it_fit(cfg, T, batch_size, precision, free, weights),
    }
    notes: list[str] = []
    runner = _Runner(device, effort, TIME_CAP_S["quick" if quick else "full"], on_progress)
    measured: dict[str, Any] = {}
    if run_measurements:
        where = (device, precision, quantize)
        measured = _measure(source, seq_lens, batch_size, where, effort, runner, notes)
    report.update(_headline(report, measured))
    report["measured"] = measured
    if quantize != "none":
        report["quantization"] = _quantization(report, source, quantize, run_measurements)
    report["scaling"] = _scaling(cfg, seq_lens, batch_size, precision, measured)
    report["skipped"] = runner.skipped
    report["notes"] = notes
    return report


def _measure(
    source: ModelSource,
    seq_lens: list[int],
    batch_size: int,
    where: tuple[torch.device, str, str],
    effort: measure.Effort,
    runner: _Runner,
    notes: list[str],
) -> dict[str, Any]:
    """Every measurement that fits: the device's peak and bandwidth, training at each T, and
    inference (quantized, and then in fp32 too) and attention at the headline T; where is the
    device, the precision and the quantize scheme."""
    cfg, T = source.config, seq_lens[-1]
    device, precision, quantize = where
    if device.type == "cpu" and precision != "fp32" and not cpu_has_fast_bf16():
        notes.append(
            f"this CPU has no bf16 matrix units (AVX512-BF16/AMX): {precision} runs far slower "
            "than fp32 here; --precision auto picks fp32"
        )
    runnable = _runnable(cfg, seq_lens, runner, notes)
    if not runnable:
        return {}
    longest = max(runnable)
    bench = measure.Bench(
        cfg, lambda: source.build(max_seq_len=longest), T, batch_size, device, precision, effort
    )
    out = _device_figures(bench, runner)
    out["train"] = _measure_training(bench, runner, runnable, notes)
    if T in runnable:
        out["inference"] = _measure_inference(replace(bench, quantize=quantize), runner)
        if quantize != "none":
            out["inference_fp32"] = _measure_inference(replace(bench, precision="fp32"), runner)
        out["attention"] = _measure_attention(bench, runner)
    done = [r for r in (*out["train"].values(), out["inference"]) if r]
    out["memory_method"] = done[0]["memory_method"] if done else None
    return out


def _runnable(
    cfg: ModelConfig, seq_lens: list[int], runner: _Runner, notes: list[str]
) -> list[int]:
    """The context lengths the model can run at (learned positions stop at max_seq_len)."""
    runnable = [t for t in seq_lens if t <= cfg.max_seq_len or cfg.pos != "learned"]
    for t in seq_lens:
        if t not in runnable:
            runner.skip(
                f"measurements at T={t}",
                f"learned position embeddings stop at max_seq_len "
                f"{cfg.max_seq_len}; the analytic figures still hold",
            )
    if runnable and max(runnable) > cfg.max_seq_len:
        notes.append(
            f"max_seq_len raised from {cfg.max_seq_len} to {max(runnable)} for the measurements "
            f"({cfg.pos} positions extend to any length; no weight changes shape)"
        )
    return runnable


def _device_figures(bench: measure.Bench, runner: _Runner) -> dict[str, Any]:
    """Warm up, then the matmul peak (MFU's denominator) and the memory bandwidth."""
    runner.on_progress("warming up")
    measure.warm_up(bench.cfg, bench.device, bench.precision)
    runner.on_progress("matmul peak")
    runner.peak_flops = measure.measure_matmul_peak(bench.device, bench.precision, bench.effort)
    runner.on_progress("memory bandwidth")
    return {
        "matmul_peak_flops": runner.peak_flops,
        "memory_bandwidth_bytes_per_s": measure.measure_bandwidth(bench.device, bench.effort),
        "memory_method": None,
        "train": {},
        "inference": None,
        "attention": {},
    }


def _measure_training(
    bench: measure.Bench, runner: _Runner, runnable: list[int], notes: list[str]
) -> dict[str, Any]:
    """A training step at each T, the headline T first: if time runs short, it is done."""
    cfg, B, precision = bench.cfg, bench.batch_size, bench.precision
    train: dict[str, Any] = {}
    for t in sorted(runnable, reverse=True):
        flops_per_token = analytic.flop_split(cfg, t).training
        result = runner.run(
            f"training step at T={t}",
            analytic.training_memory(cfg, t, B, precision)["total"],
            flops_per_token * t * B,
            lambda t=t: measure.measure_training(bench.at(t)),
        )
        if result is not None:
            result["mfu"] = result["tokens_per_s"] * flops_per_token / runner.peak_flops
            train[str(t)] = result
    if any(r["mfu"] > 1 for r in train.values()):
        notes.append(
            f"MFU above 100%: the model's matmuls ran faster than the {precision} peak "
            "measured on 1024 x 1024 matrices, so that figure is no ceiling for this device at "
            "this precision"
        )
    return train


def _measure_inference(bench: measure.Bench, runner: _Runner) -> dict[str, Any] | None:
    """Prefill and decoding at the headline T."""
    cfg, T, B = bench.cfg, bench.seq_len, bench.batch_size
    return runner.run(
        f"prefill and decoding at T={T}",
        analytic.inference_memory(cfg, T, B, bench.precision)["total"],
        2 * analytic.flop_split(cfg, T).forward * T * B,  # a prefill and an uncached step
        lambda: measure.measure_inference(bench),
    )


def _measure_attention(bench: measure.Bench, runner: _Runner) -> dict[str, Any]:
    """One layer's attention at the headline T, each implementation (--quick leaves out a large
    math one)."""
    cfg, T, B = bench.cfg, bench.seq_len, bench.batch_size
    out: dict[str, Any] = {}
    for impl in ATTENTION_IMPLS:
        need = analytic.attention_memory(cfg, T, B, bench.precision, impl)
        if impl == "math" and bench.effort is measure.QUICK and need > QUICK_MATH_BYTES:
            out[impl] = runner.skip(
                f"math attention at T={T}",
                f"its T x T matrices take ~{human_bytes(need)} and are slow to "
                "measure; run without --quick to include it",
            )
            continue
        flops = 3 * analytic.score_flops_per_position(cfg) / cfg.n_layers * T * T * B
        out[impl] = runner.run(
            f"{impl} attention at T={T}",
            need,
            flops,
            lambda impl=impl: measure.measure_attention(bench, impl),
        )
    return out


def _quantization(
    report: dict[str, Any], source: ModelSource, scheme: str, run_measurements: bool
) -> dict[str, Any]:
    """The quantized model next to fp32: weight bytes a decoded token reads, measured decoding,
    and quality (profiling/quantized.py; None with --no-measure)."""
    cfg = source.config
    ours, fp32 = (analytic.matmul_weight_bytes(cfg, "fp32", w) for w in (scheme, "none"))
    measured = report["measured"]
    speeds = [
        (measured.get(k) or {}).get("decode_tokens_per_s") for k in ("inference_fp32", "inference")
    ]
    return {
        "scheme": scheme,
        "weight_bytes_per_token": ours,
        "fp32_weight_bytes_per_token": fp32,
        "bytes_ratio": ours / fp32,
        "decode_tokens_per_s": speeds[1],
        "fp32_decode_tokens_per_s": speeds[0],
        "decode_speedup": speeds[1] / speeds[0] if all(speeds) else None,
        "quality": quantization_quality(source, scheme, report["seq_len"])
        if run_measurements
        else None,
    }


def _headline(report: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """The flat keys scripts read: throughput, MFU and memory at the headline (B, T).

    None where not measured.
    """
    T = report["seq_len"]
    train = (measured.get("train") or {}).get(str(T))
    inf = measured.get("inference")
    out: dict[str, Any] = {
        "matmul_peak_flops": measured.get("matmul_peak_flops"),
        "memory_bandwidth_bytes_per_s": measured.get("memory_bandwidth_bytes_per_s"),
        "train_tokens_per_s": train["tokens_per_s"] if train else None,
        "mfu": train["mfu"] if train else None,
        "train_peak_memory_bytes": train["peak_memory_bytes"] if train else None,
        "prefill_tokens_per_s": inf["prefill_tokens_per_s"] if inf else None,
        "decode_tokens_per_s": inf["decode_tokens_per_s"] if inf else None,
        "decode_tokens_per_s_no_cache": inf["decode_tokens_per_s_no_cache"] if inf else None,
        "decode_cache_speedup": inf["decode_tokens_per_s"] / inf["decode_tokens_per_s_no_cache"]
        if inf
        else None,
        "inference_peak_memory_bytes": inf["peak_memory_bytes"] if inf else None,
        "decode_bandwidth_bytes_per_s": None,
        "decode_bandwidth_utilization": None,
    }
    if inf:
        achieved = report["decode_bytes_per_step"] / inf["decode_step_s"]
        out["decode_bandwidth_bytes_per_s"] = achieved
        if measured.get("memory_bandwidth_bytes_per_s"):
            out["decode_bandwidth_utilization"] = (
                achieved / measured["memory_bandwidth_bytes_per_s"]
            )
    peaks = [
        p
        for p in (out["train_peak_memory_bytes"], out["inference_peak_memory_bytes"])
        if p is not None
    ]
    out["peak_memory_bytes"] = max(peaks) if peaks else None
    return out


def _scaling(
    cfg: ModelConfig, seq_lens: list[int], batch_size: int, precision: str, measured: dict[str, Any]
) -> list[dict[str, Any]]:
    """Per T: analytic FLOPs and memory next to the measured training step.

    predicted_step_s scales the step measured at the longest T by the ratio of analytic FLOPs:
    what each T would take at that T's efficiency. Shorter contexts run below it (per-op
    overheads weigh more on small matrices), which the MFU column shows.
    """
    trains = measured.get("train") or {}
    rows = []
    ref = next(((t, trains[str(t)]) for t in reversed(seq_lens) if str(t) in trains), None)
    for t in seq_lens:
        split = analytic.flop_split(cfg, t)
        step_flops = split.training * t * batch_size
        got = trains.get(str(t))
        row: dict[str, Any] = {
            "seq_len": t,
            "flops_per_token": split.training,
            "flops_per_step": step_flops,
            "attention_flops_share": split.attention_share,
            "train_memory_bytes": analytic.training_memory(cfg, t, batch_size, precision)["total"],
            "train_memory_bytes_math": analytic.training_memory(
                cfg, t, batch_size, precision, "math"
            )["total"],
            "kv_cache_bytes": analytic.kv_cache_bytes(
                cfg, t, batch_size, analytic.bytes_per_element(precision)
            ),
            "train_step_s": got["step_s"] if got else None,
            "train_tokens_per_s": got["tokens_per_s"] if got else None,
            "mfu": got["mfu"] if got else None,
            "train_peak_memory_bytes": got["peak_memory_bytes"] if got else None,
            "predicted_step_s": None,
        }
        if ref is not None:
            t0, r0 = ref
            row["predicted_step_s"] = (
                r0["step_s"]
                * step_flops
                / (analytic.flop_split(cfg, t0).training * t0 * batch_size)
            )
        rows.append(row)
    return rows
