"""LoRA vs full fine-tuning: trainable parameters, optimizer memory, peak memory and tokens/s.

    python benchmarks/finetune_memory.py                      # small and gpt2, seq-len 512, batch 4
    python benchmarks/finetune_memory.py --presets small --steps 2

Each configuration runs in a fresh process so its peak resident memory (ru_maxrss) is its own.
Random weights and tokens; AdamW step included.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

from rich.console import Console
from rich.table import Table


def measure(preset: str, method: str, seq_len: int, batch: int, steps: int, queue) -> None:
    import torch

    from models import Transformer, get_preset
    from models.lora import apply_lora
    from tformer_cli.training.loss import lm_loss
    from tformer_cli.training.optim import build_optimizer

    torch.manual_seed(0)
    cfg = get_preset(preset, max_seq_len=max(seq_len, get_preset(preset).max_seq_len))
    model = Transformer(cfg).train()
    if method == "lora":
        apply_lora(model, ["q", "k", "v", "o"], rank=8, alpha=16)
    opt = build_optimizer(model, 1e-4, 0.0, torch.device("cpu"))
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        lm_loss(model, x, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    optim_bytes = sum(
        v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )
    queue.put(
        {
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "params": sum(p.numel() for p in model.parameters()),
            "optim_bytes": optim_bytes,
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "tokens_per_s": batch * seq_len / sorted(times)[len(times) // 2],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="small,gpt2")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    console = Console()
    table = Table(
        title=f"fine-tuning at seq-len {args.seq_len}, batch {args.batch_size}, fp32, CPU"
    )
    for col in (
        "preset",
        "method",
        "trainable params",
        "optimizer state",
        "peak memory",
        "tokens/s",
    ):
        table.add_column(col, justify="right")
    ctx = mp.get_context("spawn")
    for preset in args.presets.split(","):
        for method in ("full", "lora"):
            queue = ctx.Queue()
            proc = ctx.Process(
                target=measure,
                args=(preset, method, args.seq_len, args.batch_size, args.steps, queue),
            )
            proc.start()
            r = queue.get()
            proc.join()
            console.print(f"{preset} {method}: {r['tokens_per_s']:,.0f} tokens/s")
            table.add_row(
                preset,
                method,
                f"{r['trainable']:,} ({100 * r['trainable'] / r['params']:.1f}%)",
                f"{r['optim_bytes'] / 2**20:,.1f} MiB",
                f"{r['peak_bytes'] / 2**20:,.0f} MiB",
                f"{r['tokens_per_s']:,.0f}",
            )
    console.print(table)


if __name__ == "__main__":
    main()
