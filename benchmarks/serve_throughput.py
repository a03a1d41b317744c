"""`tformer serve` throughput: 8 concurrent greedy clients against the same 8 requests served one
after another.

    python benchmarks/serve_throughput.py                         # small, 8 clients, 128 tokens
    python benchmarks/serve_throughput.py --stream                # streamed as server-sent events
    python benchmarks/serve_throughput.py --preset tiny --clients 4 --new-tokens 64

Builds a run with random `small` weights (speed does not depend on them) and a tokenizer trained
on the Python documentation every Python ships, starts `tformer serve` on it in a process of its
own (fp32 unless --precision or --quantize say otherwise), and asks for completions from client
threads of this process: greedy, a short prompt each, `ignore_eos` so every reply is
--new-tokens long, each answered whole (with --stream: streamed, which adds the client's and the
server's work per token). Figures:

- sequential: the requests one after another, each alone in the batch;
- concurrent: all at once, decoded together by the server's continuous batching;
- tokens/s: completion tokens over the wall time from the first request to the last answer;
- peak batch: the most rows the server decoded in one step (its /metrics).

Each figure is the median of --repeats runs. Decoding `small` at batch 1 reads all 61 MB of fp32
weights per token; a batch of 8 reads them once for 8 tokens, which is where the speed-up comes
from.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from models import Transformer, get_preset, save_model
from tformer_cli.data.tokenizer import train_tokenizer

WORDS = "data model object class function value method module import return yield".split()


def build_run(directory: Path, preset: str) -> Path:
    """A run with random weights of the preset and a 2,048-token tokenizer."""
    from pydoc_data.topics import topics

    corpus = directory / "corpus.txt"
    corpus.write_text("\n\n".join(topics.values()), encoding="utf-8")
    tok = train_tokenizer([corpus], directory / "tok.model", vocab_size=2048)
    run = directory / preset
    torch.manual_seed(0)
    # the recorded sha256 vouches for a tokenizer smaller than the model's vocabulary
    save_model(Transformer(get_preset(preset)), run, extra={"tokenizer_sha256": tok.sha256})
    (run / "tokenizer.model").write_bytes(tok.path.read_bytes())
    return run


def start_server(run: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """`tformer serve` on a free port; its URL once it listens."""
    cmd = [sys.executable, "-m", "tformer_cli", "serve", "-m", str(run), "--port", "0"]
    cmd += ["--precision", args.precision, "--quantize", args.quantize]
    cmd += ["--max-batch", str(args.clients)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if match := re.search(r"serving on (http://\S+):", line):
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, match.group(1)
    raise SystemExit(f"tformer serve did not start (exit {proc.wait()})")


def complete(url: str, prompt: str, new_tokens: int, stream: bool) -> int:
    """One greedy completion, streamed or whole; the completion tokens it reports."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    if not stream:
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        return r.json()["usage"]["completion_tokens"]
    body.update(stream=True, stream_options={"include_usage": True})
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return tokens


def sequential(url: str, prompts: list[str], new_tokens: int, stream: bool) -> float:
    """Tokens/s with the requests sent one after another."""
    start = time.perf_counter()
    tokens = sum(complete(url, p, new_tokens, stream) for p in prompts)
    return tokens / (time.perf_counter() - start)


def concurrent(url: str, prompts: list[str], new_tokens: int, stream: bool) -> float:
    """Tokens/s with every request sent at once, a client thread each."""
    counts = [0] * len(prompts)

    def one(i: int) -> None:
        """One client: one request."""
        counts[i] = complete(url, prompts[i], new_tokens, stream)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if min(counts) != new_tokens:
        raise SystemExit(f"a reply was short: {counts}")
    return sum(counts) / elapsed


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream", action="store_true", help="stream the replies (SSE)")
    parser.add_argument("--precision", default="fp32", help="as for tformer serve (auto: its pick)")
    parser.add_argument("--quantize", default="none", choices=("none", "int8"))
    return parser.parse_args()


def main() -> None:
    """Start the server, warm it up, measure both ways, print the figures."""
    args = parse_args()
    prompts = [" ".join(WORDS[i % len(WORDS) :] + WORDS)[:60] for i in range(args.clients)]
    with tempfile.TemporaryDirectory(prefix="tformer-serve-bench-") as tmp:
        run = build_run(Path(tmp), args.preset)
        proc, url = start_server(run, args)
        try:
            complete(url, prompts[0], 8, args.stream)  # warm up
            n, stream = args.new_tokens, args.stream
            seq = [sequential(url, prompts, n, stream) for _ in range(args.repeats)]
            con = [concurrent(url, prompts, n, stream) for _ in range(args.repeats)]
            peak = httpx.get(url + "/metrics", timeout=30).json()["peak_batch_size"]
        finally:
            proc.terminate()
            proc.wait(60)
    s, c = statistics.median(seq), statistics.median(con)
    print(
        f"tformer serve, {args.preset} (--precision {args.precision} --quantize {args.quantize}, "
        f"{torch.get_num_threads()} threads), {args.clients} greedy requests of "
        f"{args.new_tokens} tokens, " + ("streamed" if args.stream else "answered whole")
    )
    print(f"  one after another: {s:8.1f} tokens/s   (runs: {', '.join(f'{x:.0f}' for x in seq)})")
    print(f"  all at once:       {c:8.1f} tokens/s   (runs: {', '.join(f'{x:.0f}' for x in con)})")
    print(f"  speed-up: {c / s:.2f}x; peak batch {peak}")


if __name__ == "__main__":
    main()
