"""Generation speed: prefill tokens/s, time to first token, decode tokens/s with and without the
KV cache.

    python benchmarks/generate_throughput.py                       # small and gpt2, batch 1 and 8
    python benchmarks/generate_throughput.py --presets small --batch-sizes 1 --precision bf16
    python benchmarks/generate_throughput.py --quantize int8

Random weights (speed does not depend on them), a 128-token prompt, greedy decoding through the
same engine as `tformer generate` (tformer_cli.inference.text.generate) on a model prepared the
way the command prepares it (`tformer_cli.device.ready_for_inference`: int8 weights with
--quantize int8, packed bf16 weights for bf16 on a CPU with bf16 hardware). Columns:

- prefill: prompt tokens/s of the one-pass prefill; first token: prefill + the first sample
- decode: tokens/s after the first, through the model's fused one-token step and the KV cache
- hidden: the same with generate(..., fused=False): decoding through model.hidden (the unfused
  forward) instead of the fused step
- no cache: recomputing the whole context every step (`--no-cache`)
- same: whether greedy decoding gave the same tokens on all three paths

Decoding one token reads every weight once; for `small` that is 61 MB in fp32 (the 32000 x 288
head alone is 37 MB), so the figure is bound by memory bandwidth as much as by per-op overhead.
Each figure is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from models import Transformer, get_preset
from models.quantize import SCHEMES
from tformer_cli.device import ready_for_inference, resolve_device
from tformer_cli.inference.load import inference_target
from tformer_cli.inference.sampling import SamplingConfig
from tformer_cli.inference.text import generate

GREEDY = SamplingConfig(temperature=0)


class NullTokenizer:
    """Just enough of a tokenizer for the engine: nothing ends a row, text is not decoded."""

    bos_id, eos_id, marker_ids, vocab_size = 1, -1, {}, 1 << 30

    def decode(self, ids: list[int]) -> str:
        return ""


def measure(
    preset: str, batch: int, args: argparse.Namespace, device: torch.device, precision: str
) -> dict:
    """The figures of one preset at one batch size: fused, hidden() and uncached decoding."""
    torch.manual_seed(0)
    model = ready_for_inference(Transformer(get_preset(preset)), device, precision, args.quantize)
    tok = NullTokenizer()
    prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len)).tolist()
    n = min(args.new_tokens, model.config.max_seq_len - args.prompt_len)  # stay inside one window
    generate(model, tok, prompts, GREEDY, 4)  # warm up
    runs = [generate(model, tok, prompts, GREEDY, n) for _ in range(args.repeats)]
    hidden = [generate(model, tok, prompts, GREEDY, n, fused=False) for _ in range(args.repeats)]
    no_cache = generate(model, tok, prompts, GREEDY, args.no_cache_tokens, use_cache=False)
    k = args.no_cache_tokens
    same = all(
        a.ids == b.ids and a.ids[:k] == c.ids
        for a, b, c in zip(runs[0][0], hidden[0][0], no_cache[0], strict=True)
    )
    med = statistics.median
    return {
        "prefill": med(s.prefill_tokens_per_s for _, s in runs),
        "ttft_ms": 1000 * med(s.prefill_seconds for _, s in runs),
        "decode": med(s.decode_tokens_per_s for _, s in runs),
        "hidden": med(s.decode_tokens_per_s for _, s in hidden),
        "no_cache": no_cache[1].decode_tokens_per_s,
        "same": same,
    }


COLUMNS = (
    "preset",
    "batch",
    "prefill tok/s",
    "first token",
    "decode tok/s",
    "hidden tok/s",
    "no cache tok/s",
    "cache speed-up",
    "same",
)


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="small,gpt2")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--no-cache-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", default="none", choices=SCHEMES)
    return parser.parse_args()


def row(preset: str, batch: int, r: dict) -> tuple[str, ...]:
    """One table row, in COLUMNS' order."""
    return (
        preset,
        str(batch),
        f"{r['prefill']:,.0f}",
        f"{r['ttft_ms']:,.0f} ms",
        f"{r['decode']:,.0f}",
        f"{r['hidden']:,.0f}",
        f"{r['no_cache']:,.1f}",
        f"{r['decode'] / r['no_cache']:.0f}x",
        "yes" if r["same"] else "NO",
    )


def main() -> None:
    """Measure each preset at each batch size and print the table."""
    args = parse_args()
    device = resolve_device(args.device)
    _, precision = inference_target(args.device, args.precision, args.quantize)
    console = Console(width=None if sys.stdout.isatty() else 120)  # a readable table in a log too
    table = Table(
        title=f"generation on {device} {precision}"
        + ("" if args.quantize == "none" else f" activations, {args.quantize} weights")
        + f", {torch.get_num_threads()} threads, "
        f"prompt {args.prompt_len} tokens, greedy"
    )
    for col in COLUMNS:
        table.add_column(col, justify="right")
    start = time.perf_counter()
    for preset in args.presets.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            r = measure(preset, batch, args, device, precision)
            console.print(
                f"{preset} batch {batch}: decode {r['decode']:,.0f} tokens/s", style="dim"
            )
            table.add_row(*row(preset, batch, r))
    console.print(table)
    console.print(f"[dim]{time.perf_counter() - start:.0f} s[/]")


if __name__ == "__main__":
    main()
