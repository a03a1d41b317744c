"""Will it fit? The largest batch and context the analytic memory model allows in a budget."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from models.config import ModelConfig
from tformer_cli.profiling.analytic import inference_memory, training_memory
from tformer_cli.units import human_bytes

HEADROOM = 0.9  # leave 10% of the free memory to the runtime, the allocator's slack and the OS
T_CAP = 1 << 22  # search no further than 4M tokens of context


def largest(fits: Callable[[int], bool], cap: int) -> int:
    """The largest n in 1..cap with fits(n), for a monotone fits; 0 when even 1 does not fit."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:  # fits(lo) holds, fits(hi) does not (or hi is past the cap)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def will_it_fit(
    cfg: ModelConfig,
    seq_len: int,
    batch_size: int,
    precision: str,
    free_bytes: int | None,
    weights: str = "none",
) -> dict[str, Any]:
    """Training and inference needs at (B, T), and the largest B (at T) and T (at B) within the
    budget; weights is the inference weights' form (analytic.inference_memory)."""
    report: dict[str, Any] = {"free_bytes": free_bytes, "headroom": HEADROOM, "budget_bytes": None}
    needs = {
        "train": lambda b, t: training_memory(cfg, t, b, precision)["total"],
        "inference": lambda b, t: inference_memory(cfg, t, b, precision, weights)["total"],
    }
    budget = int(free_bytes * HEADROOM) if free_bytes else None
    report["budget_bytes"] = budget
    notes = []
    for mode, need in needs.items():
        entry: dict[str, Any] = {"bytes": need(batch_size, seq_len)}
        if budget is not None:
            entry["fits"] = entry["bytes"] <= budget
            entry["max_batch_size"] = largest(
                lambda b, need=need: need(b, seq_len) <= budget, 1 << 20
            )
            entry["max_seq_len"] = largest(
                lambda t, need=need: need(batch_size, t) <= budget, T_CAP
            )
            if not entry["fits"]:
                notes.append(
                    f"{mode} at batch {batch_size} x {seq_len} tokens needs "
                    f"{human_bytes(entry['bytes'])}, more than the {human_bytes(budget)} budget "
                    f"({HEADROOM:.0%} of what is free)"
                )
        report[mode] = entry
    if cfg.pos == "learned":
        notes.append(
            f"learned positions stop at max_seq_len {cfg.max_seq_len}, whatever memory allows"
        )
    report["notes"] = notes
    return report


def require_fit(
    job: str, cfg: ModelConfig, seq_len: int, batch_size: int, precision: str, device, flag: str
) -> None:
    """Refuse, before anything is allocated, a batch that the memory model says cannot fit.

    job is "train" or "inference"; flag names the option to lower in the message (e.g.
    "--batch-size 100000000"). Where free memory cannot be read, nothing is refused.
    """
    from tformer_cli.device import inference_weights
    from tformer_cli.errors import TformerError
    from tformer_cli.profiling.memory import available_memory

    free = available_memory(device)
    if not free:
        return
    budget = int(free * HEADROOM)
    if job == "train":
        need = training_memory
    else:  # as the model will run: bf16 may mean packed weights around fp32 activations
        weights = inference_weights(device, precision)
        need = partial(inference_memory, weights=weights)
    needed = need(cfg, seq_len, batch_size, precision)["total"]
    if needed <= budget:
        return
    fits = largest(lambda b: need(cfg, seq_len, b, precision)["total"] <= budget, batch_size)
    what = "training" if job == "train" else "generating"
    advice = (
        f"the largest batch that fits is {fits}"
        if fits
        else "not even a batch of 1 fits; use a smaller model or --seq-len"
    )
    raise TformerError(
        f"{flag}: {what} {batch_size} x {seq_len} tokens needs about {human_bytes(needed)} but "
        f"{device.type} has {human_bytes(free)} free; {advice}"
    )
