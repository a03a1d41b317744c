"""Generation speed: prefill tokens/s, decode tokens/s with and without the KV cache, time to first token.

    python benchmarks/generate_throughput.py                       # small and gpt2, batch 1 and 8
    python benchmarks/generate_throughput.py --presets small --batch-sizes 1 --precision bf16

Random weights (speed does not depend on them); the prompt is 128 tokens. Decoding goes through
the same engine as `tformer generate` (tformer_cli.generation.generate), sampling included.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from models import Transformer, get_preset
from tformer_cli.device import DTYPES, resolve_device, resolve_precision
from tformer_cli.generation import generate
from tformer_cli.sampling import SamplingConfig


class NullTokenizer:
    """Just enough of a tokenizer for the engine: no EOS ever ends a row, text is not decoded."""

    bos_id, eos_id, marker_ids = 1, -1, {}

    def decode(self, ids: list[int]) -> str:
        return ""


def run(preset: str, batch: int, prompt_len: int, new_tokens: int, no_cache_tokens: int, device, dtype) -> dict:
    torch.manual_seed(0)
    model = Transformer(get_preset(preset)).to(device=device, dtype=dtype).eval()
    tok = NullTokenizer()
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len)).tolist()
    greedy = SamplingConfig(temperature=0)
    generate(model, tok, prompts, greedy, 4)  # warm up
    _, cached = generate(model, tok, prompts, greedy, new_tokens)
    _, uncached = generate(model, tok, prompts, greedy, no_cache_tokens, use_cache=False)
    return {
        "prefill": batch * prompt_len / cached.prefill_seconds,
        "ttft_ms": 1000 * cached.prefill_seconds,
        "decode": cached.new_tokens / cached.decode_seconds,
        "decode_no_cache": uncached.new_tokens / uncached.decode_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="small,gpt2")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-cache-tokens", type=int, default=16)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    console = Console()
    table = Table(title=f"generation on {device} {precision}, {torch.get_num_threads()} threads, "
                        f"prompt {args.prompt_len} tokens")
    for col in ("preset", "batch", "prefill tok/s", "time to first token", "decode tok/s (cache)", "decode tok/s (no cache)", "cache speed-up"):
        table.add_column(col, justify="right")
    for preset in args.presets.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            r = run(preset, batch, args.prompt_len, args.new_tokens, args.no_cache_tokens, device, DTYPES[precision])
            console.print(f"{preset} batch {batch}: decode {r['decode']:,.0f} tokens/s")
            table.add_row(preset, str(batch), f"{r['prefill']:,.0f}", f"{r['ttft_ms']:,.0f} ms", f"{r['decode']:,.0f}",
                          f"{r['decode_no_cache']:,.0f}", f"{r['decode'] / r['decode_no_cache']:.1f}x")
    console.print(table)


if __name__ == "__main__":
    main()
