"""Training throughput: tokens/s, ms/step, model FLOP/s and MFU for presets at seq-len 256.

    python benchmarks/train_throughput.py         # tiny and small, fp32 and bf16, batch 8 and 32
    python benchmarks/train_throughput.py --presets small --batch-sizes 8 --precisions fp32

Model FLOPs per token are 6N + 12·L·T·d (models.flops.flops_per_token); MFU is measured
against this device's measured matmul peak at the same precision. bf16 is skipped on CPUs
without hardware bf16 (AVX512-BF16/AMX), where it is emulated and ~100x slower.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from rich.console import Console
from rich.table import Table

from models import Transformer, get_preset
from models.flops import flops_per_token
from tformer_cli.device import DTYPES, cpu_has_fast_bf16, matmul_peak_flops, resolve_device
from tformer_cli.training.loss import lm_loss
from tformer_cli.training.optim import build_optimizer


def measure(
    preset: str, batch: int, seq_len: int, precision: str, device: torch.device, steps: int
) -> dict:
    torch.manual_seed(0)
    cfg = get_preset(preset)
    model = Transformer(cfg).to(device).train()
    opt = build_optimizer(model, 1e-3, 0.1, device)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
    amp = (
        torch.autocast(device.type, dtype=DTYPES[precision])
        if precision != "fp32"
        else contextlib.nullcontext()
    )

    def step() -> None:
        with amp:
            loss = lm_loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    ms = sorted(times)[len(times) // 2] * 1000
    tokens_per_s = batch * seq_len / (ms / 1000)
    flops = flops_per_token(cfg, seq_len) * tokens_per_s
    return {"tokens_per_s": tokens_per_s, "ms_per_step": ms, "flops": flops}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    console = Console()
    table = Table(
        title=f"training throughput on {device} ({torch.get_num_threads()} threads), "
        f"seq-len {args.seq_len}"
    )
    for col in (
        "preset",
        "precision",
        "batch",
        "tokens/s",
        "ms/step",
        "model GFLOP/s",
        "peak GFLOP/s",
        "MFU",
    ):
        table.add_column(col, justify="right")
    peaks: dict[str, float] = {}
    for precision in args.precisions.split(","):
        if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
            console.print("bf16: skipped, this CPU has no hardware bf16 (AVX512-BF16/AMX)")
            continue
        peaks[precision] = matmul_peak_flops(device, precision, seconds=1.0)
        for preset in args.presets.split(","):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                r = measure(preset, batch, args.seq_len, precision, device, args.steps)
                table.add_row(
                    preset,
                    precision,
                    str(batch),
                    f"{r['tokens_per_s']:,.0f}",
                    f"{r['ms_per_step']:,.0f}",
                    f"{r['flops'] / 1e9:,.1f}",
                    f"{peaks[precision] / 1e9:,.0f}",
                    f"{100 * r['flops'] / peaks[precision]:.0f}%",
                )
                console.print(
                    f"{preset} {precision} batch {batch}: {r['tokens_per_s']:,.0f} tokens/s"
                )
    console.print(table)


if __name__ == "__main__":
    main()
