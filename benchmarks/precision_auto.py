"""What `--precision auto` should pick here: each precision timed side by side, in one run.

    python benchmarks/precision_auto.py                 # decoding and a training step
    python benchmarks/precision_auto.py --repeats 5 --skip-train

Decoding: `tformer generate` on a `micro` run (the `make demo` shape, random weights, a tokenizer
trained on the corpus) with default flags and with each explicit --precision, greedy, the runs
interleaved so a slow moment hits all of them alike; decode tokens/s from `--json`, median of
--repeats. It prints whether the default is within 10% of the fastest (the issue's target).

Training: `tformer train` for a few dozen steps of `micro` in fp32 and (where the CPU has
hardware bf16, or on CUDA) bf16, tokens/s from the run card. The rule in
tformer_cli/device.py:auto_precision was written down from these figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from corpora import benchmark_corpus
from rich.console import Console
from rich.table import Table

from models import Transformer, get_preset, save_model
from tformer_cli.data.tokenizer import train_tokenizer
from tformer_cli.device import auto_precision, cpu_has_fast_bf16, resolve_device


def tformer(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tformer_cli", *args], capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"tformer {' '.join(args)} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def precisions(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["fp32", "bf16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]
    return ["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"]


def bench_decode(run: Path, device: torch.device, args: argparse.Namespace) -> Table:
    names = ["auto", *precisions(device)]
    rates: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            flags = [] if name == "auto" else ["--precision", name]
            out = tformer(
                "generate",
                "-m",
                str(run),
                "-p",
                "The",
                "-n",
                str(args.new_tokens),
                "--temperature",
                "0",
                "--json",
                *flags,
            )
            rates[name].append(out["decode_tokens_per_s"])
    medians = {n: statistics.median(v) for n, v in rates.items()}
    best = max(medians[n] for n in names[1:])
    picked, why = auto_precision(device, "inference")
    table = Table(title=f"decoding micro on {device}: default picks {picked} ({why})")
    for col in ("--precision", "decode tok/s (median)", "runs", "vs fastest"):
        table.add_column(col, justify="right")
    for name in names:
        runs = ", ".join(f"{r:,.0f}" for r in rates[name])
        table.add_row(name, f"{medians[name]:,.0f}", runs, f"{medians[name] / best:.2f}x")
    verdict = "within 10%" if medians["auto"] >= 0.9 * best else "MORE THAN 10% SLOWER"
    table.caption = f"default flags: {verdict} of the fastest precision"
    return table


def bench_train(
    text: Path, tok: Path, work: Path, device: torch.device, args: argparse.Namespace
) -> Table:
    picked, why = auto_precision(device, "train")
    table = Table(title=f"training micro on {device}: auto picks {picked} ({why})")
    for col in ("--precision", "tokens/s (median)", "vs fp32"):
        table.add_column(col, justify="right")
    rates: dict[str, list[float]] = {p: [] for p in precisions(device)}
    for i in range(args.repeats):
        for p in rates:
            card = tformer(
                "train",
                str(text),
                "-o",
                str(work / f"t-{p}-{i}"),
                "--preset",
                "micro",
                "--tokenizer",
                str(tok),
                "--max-steps",
                str(args.train_steps),
                "--eval-every",
                "100000",
                "--eval-batches",
                "1",
                "--sample-every",
                "0",
                "--precision",
                p,
                "--cache-dir",
                str(work / "cache"),
                "--json",
                "--quiet",
            )
            rates[p].append(card["tokens_per_s"])
    base = statistics.median(rates["fp32"])
    for p, values in rates.items():
        table.add_row(
            p, f"{statistics.median(values):,.0f}", f"{statistics.median(values) / base:.2f}x"
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    device = resolve_device("auto")
    console = Console(width=None if sys.stdout.isatty() else 120)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text = benchmark_corpus(work)
        tok = train_tokenizer([text], work / "tok.model", vocab_size=4096).path
        run = work / "run"
        torch.manual_seed(0)
        save_model(Transformer(get_preset("micro", vocab_size=4096)), run)
        (run / "tokenizer.model").write_bytes(tok.read_bytes())
        console.print(bench_decode(run, device, args))
        if not args.skip_train:
            console.print(bench_train(text, tok, work, device, args))


if __name__ == "__main__":
    main()
