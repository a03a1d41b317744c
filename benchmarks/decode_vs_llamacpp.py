"""tformer against llama.cpp on the same model, side by side in one run.

    PYTHONPATH=. python benchmarks/decode_vs_llamacpp.py                  # small and gpt2
    PYTHONPATH=. python benchmarks/decode_vs_llamacpp.py --presets small --rounds 5

For each preset (`small`, the stories15M shape, and `gpt2`) it builds the model with random
weights (speed does not depend on them), saves it as a run, exports it with
`tformer export --format gguf` in f32 and q8_0, and then measures, in interleaved rounds (each
engine once per round, so a busy moment hits them all alike), medians of --rounds:

- decode: tokens/s of 256 greedy tokens at batch 1 after BOS (the first token not counted):
  llama.cpp f32 and q8_0 through llama-cpp-python, and tformer through its own engine
  (tformer_cli.inference.text.generate, as `tformer generate` runs it) in fp32, bf16 (packed
  weights, where the CPU has bf16 hardware) and int8 (`--quantize int8`); the same thread count
- vs llama.cpp: the ratio to llama.cpp at the same precision (fp32 and bf16 to f32, int8 to q8_0)
- bandwidth: weight bytes read per token (each matmul weight once: 4 bytes in f32, 2 in bf16,
  1 + a 4-byte scale per row in int8, 34 bytes per 32 in q8_0) x tokens/s over the read
  bandwidth measured here (a 256 MiB torch sum); above 100% means the weights sat in cache
- prefill: tokens/s of one 512-token prompt; batch 8: decode tokens/s of 8 rows x 128 tokens
  (llama.cpp: 8 sequences in one llama_batch)

llama-cpp-python is not a dependency of tformer: build it from source for this CPU with

    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" pip install llama-cpp-python==0.3.36

(about 12 minutes on 2 cores) and `pip install gguf` for the export. Without llama_cpp the
llama.cpp rows are left out, saying so. --wait-idle waits before each round until the CPU is
idle (for a shared machine; see /proc/stat).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from corpora import benchmark_corpus
from rich.console import Console
from rich.table import Table

from models import Transformer, get_preset, save_model
from models.flops import matmul_params
from tformer_cli.data.tokenizer import train_tokenizer
from tformer_cli.device import packs_bf16, ready_for_inference
from tformer_cli.inference.sampling import SamplingConfig
from tformer_cli.inference.text import generate
from tformer_cli.profiling.analytic import matmul_weight_bytes
from tformer_cli.profiling.memory import device_name

GREEDY = SamplingConfig(temperature=0)
PREFILL = 512


class NullTokenizer:
    """Just enough of a tokenizer for the engine: nothing ends a row, text is not decoded."""

    bos_id, eos_id, marker_ids, vocab_size = 1, -1, {}, 1 << 30

    def decode(self, ids: list[int]) -> str:
        return ""


@dataclass
class Engine:
    """One way to run a preset: its name, precision label, weight bytes per token, and runs."""

    name: str
    precision: str
    bytes_per_token: float
    decode: list[float] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)
    batch8: list[float] = field(default_factory=list)


# -- tformer -----------------------------------------------------------------------------------


def tformer_engine(model: Transformer, batch: int, new_tokens: int, prompt_len: int = 1):
    """A function that generates once and returns (decode tokens/s, prefill tokens/s)."""
    gen = torch.Generator().manual_seed(0)
    prompts = [
        [1, *torch.randint(0, model.config.vocab_size, (prompt_len - 1,), generator=gen).tolist()]
        for _ in range(batch)
    ]

    def run() -> tuple[float, float]:
        _, stats = generate(model, NullTokenizer(), prompts, GREEDY, new_tokens, eos_ids=())
        return stats.decode_tokens_per_s, stats.prefill_tokens_per_s

    return run


# -- llama.cpp ---------------------------------------------------------------------------------


def llama_engine(path: Path, threads: int, new_tokens: int):
    """(decode at batch 1, prefill of PREFILL tokens, decode at batch 8) functions, each
    returning tokens/s, for a GGUF file."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=PREFILL + new_tokens,
        n_batch=PREFILL,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def argmax(i: int) -> int:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))

    def decode() -> float:
        llm.reset()
        token, start = llm.token_bos(), 0.0
        for i in range(new_tokens):
            if i == 1:
                start = time.perf_counter()  # as tformer: the first token is not counted
            llm.eval([token])
            token = argmax(-1)
        return (new_tokens - 1) / (time.perf_counter() - start)

    def prefill() -> float:
        llm.reset()
        prompt = np.random.default_rng(0).integers(3, n_vocab, PREFILL).tolist()
        start = time.perf_counter()
        llm.eval(prompt)
        return PREFILL / (time.perf_counter() - start)

    return decode, prefill, llama_batch8(llm, threads, new_tokens // 2)


def llama_batch8(llm, threads: int, new_tokens: int, rows: int = 8):
    """Decode tokens/s of `rows` sequences in one llama_batch per step (a context of its own)."""
    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_context_default_params()
    # each sequence gets n_ctx / n_seq_max slots: the model's own context, as in tformer
    params.n_ctx, params.n_batch, params.n_seq_max = rows * (PREFILL + 8), rows, rows
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    batch = llama_cpp.llama_batch_init(rows, 0, 1)
    n_vocab = llm.n_vocab()

    def run() -> float:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        tokens, start = [llm.token_bos()] * rows, 0.0
        for step in range(new_tokens):
            if step == 1:
                start = time.perf_counter()
            batch.n_tokens = rows
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, step, 1
                batch.seq_id[i][0], batch.logits[i] = i, True
            llama_cpp.llama_decode(ctx, batch)
            tokens = [
                int(
                    np.argmax(
                        np.ctypeslib.as_array(
                            llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)
                        )
                    )
                )
                for i in range(rows)
            ]
        return rows * (new_tokens - 1) / (time.perf_counter() - start)

    return run


# -- the setting -------------------------------------------------------------------------------


def read_bandwidth(mib: int = 256) -> float:
    """Bytes/s that a torch sum reads from a tensor far larger than the caches (median of 5)."""
    x = torch.ones(mib << 18)
    x.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.nbytes / statistics.median(times)


def wait_idle(most_s: float = 300.0, busy: float = 0.1) -> None:
    """Return once the CPU was idle for a quarter second (or after most_s): /proc/stat."""

    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)

    end = time.time() + most_s
    while time.time() < end:
        (i0, t0), _ = snap(), time.sleep(0.25)
        i1, t1 = snap()
        if 1 - (i1 - i0) / max(1, t1 - t0) < busy:
            return


def make_run(preset: str, directory: Path, tokenizer: Path) -> tuple[Path, Transformer]:
    """A run of the preset with seeded random weights and the tokenizer, for `tformer export`
    (the context raised to hold the prefill: no weight changes shape)."""
    cfg = get_preset(preset)
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, PREFILL + 8))
    torch.manual_seed(0)
    model = Transformer(cfg)
    from tformer_cli.data.tokenizer import load_tokenizer

    run = directory / preset
    # the recorded sha256 says the tokenizer is the run's own: fewer ids than rows is fine then
    save_model(model, run, extra={"tokenizer_sha256": load_tokenizer(tokenizer).sha256})
    (run / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return run, model


def export(run: Path, kind: str) -> Path:
    """tformer export --format gguf --type kind."""
    out = run.parent / f"{run.name}-{kind}.gguf"
    args = ["export", str(run), "--format", "gguf", "--type", kind, "-o", str(out)]
    done = subprocess.run([sys.executable, "-m", "tformer_cli", *args], capture_output=True)
    if done.returncode:
        raise SystemExit(f"tformer {' '.join(args)} failed:\n{done.stderr.decode()}")
    return out


def tformer_engines(model: Transformer, new_tokens: int) -> dict[str, tuple[Engine, list]]:
    """tformer in fp32, packed bf16 (where the CPU has bf16 hardware) and int8: each an Engine
    and its (decode, prefill, batch-8) functions."""
    cpu, cfg, state = torch.device("cpu"), model.config, model.state_dict()
    kinds = [("fp32", "fp32", "none"), ("int8", "fp32", "int8")]
    if packs_bf16(cpu):
        kinds.insert(1, ("bf16", "bf16", "none"))
    out = {}
    for label, precision, quantize in kinds:
        copy = Transformer(cfg)
        copy.load_state_dict(state)
        ready = ready_for_inference(copy, cpu, precision, quantize)
        weights = quantize if quantize != "none" else ("bf16" if precision == "bf16" else "none")
        engine = Engine(f"tformer {label}", label, matmul_weight_bytes(cfg, "fp32", weights))
        runs = [
            tformer_engine(ready, 1, new_tokens),
            tformer_engine(ready, 1, 1, prompt_len=PREFILL),
            tformer_engine(ready, 8, new_tokens // 2),
        ]
        out[label] = (engine, runs)
    return out


def llama_engines(
    run: Path, model: Transformer, threads: int, new_tokens: int
) -> dict[str, tuple[Engine, list]]:
    """llama.cpp on the run's f32 and q8_0 exports."""
    n = matmul_params(model.config)
    out = {}
    for kind, per_weight in (("f32", 4.0), ("q8_0", 34 / 32)):
        engine = Engine(f"llama.cpp {kind}", kind, n * per_weight)
        out[kind] = (engine, list(llama_engine(export(run, kind), threads, new_tokens)))
    return out


def measure(engines: dict[str, tuple[Engine, list]], rounds: int, idle: bool) -> None:
    """Every engine once per round, after a warm-up: decode, prefill, batch 8."""
    for _, runs in engines.values():
        runs[0]()
    for _ in range(rounds):
        if idle:
            wait_idle()
        for engine, (decode, prefill, batch8) in engines.values():
            engine.decode.append(_first(decode()))
            engine.prefill.append(_second(prefill()))
            engine.batch8.append(_first(batch8()))


def _first(result: float | tuple[float, float]) -> float:
    return result[0] if isinstance(result, tuple) else result


def _second(result: float | tuple[float, float]) -> float:
    return result[1] if isinstance(result, tuple) else result


REFERENCE = {"fp32": "f32", "bf16": "f32", "int8": "q8_0", "f32": "f32", "q8_0": "q8_0"}


def rows(preset: str, engines: dict[str, Engine], bandwidth: float) -> list[tuple[str, ...]]:
    """Table rows of one preset: medians, the ratio to llama.cpp, bandwidth utilisation."""
    med = {k: statistics.median(e.decode) for k, e in engines.items()}
    out = []
    for key, e in engines.items():
        ref = REFERENCE[e.precision] if e.name.startswith("tformer") else None
        ratio = f"{med[key] / med[ref]:.2f}x {ref}" if ref in med else "-"
        out.append(
            (
                preset,
                e.name,
                f"{med[key]:,.1f}",
                ratio,
                f"{100 * e.bytes_per_token * med[key] / bandwidth:.0f}%",
                f"{statistics.median(e.prefill):,.0f}",
                f"{statistics.median(e.batch8):,.0f}",
            )
        )
    return out


def targets(results: dict[str, dict[str, Engine]]) -> list[str]:
    """The issue's targets, met or not, from the medians."""
    med = {
        p: {k: statistics.median(e.decode) for k, e in engines.items()}
        for p, engines in results.items()
    }
    lines = []
    checks = [
        ("small", "int8", "f32", 1.0, "tformer int8 >= llama.cpp f32"),
        ("small", "int8", "q8_0", 0.6, "tformer int8 >= 0.6x llama.cpp q8_0"),
        ("small", "fp32", "f32", 0.6, "tformer fp32 >= 0.6x llama.cpp f32"),
        ("gpt2", "int8", "fp32", 2.5, "gpt2: tformer int8 >= 2.5x tformer fp32"),
    ]
    for preset, ours, ref, factor, text in checks:
        m = med.get(preset, {})
        if ours in m and ref in m:
            got = m[ours] / m[ref]
            lines.append(f"{text}: {got:.2f}x ({'met' if got >= factor else 'NOT met'})")
    return lines


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="small,gpt2")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wait-idle", action="store_true")
    return parser.parse_args()


def main() -> None:
    """Build, export and measure each preset; print the table and the targets."""
    args = parse_args()
    console = Console(width=None if sys.stdout.isatty() else 130)
    threads = torch.get_num_threads()
    try:
        import llama_cpp  # noqa: F401

        have_llama = True
    except ImportError:
        have_llama = False
        console.print("llama_cpp is not installed: llama.cpp rows left out (see --help)")
    bandwidth = read_bandwidth()
    results: dict[str, dict[str, Engine]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(
            [benchmark_corpus(Path(tmp))], Path(tmp) / "tok.model", vocab_size=1000
        ).path
        for preset in args.presets.split(","):
            run, model = make_run(preset, Path(tmp), tok)
            engines = tformer_engines(model, args.new_tokens)
            if have_llama:
                engines.update(llama_engines(run, model, threads, args.new_tokens))
            console.print(f"[dim]{preset}: measuring {', '.join(engines)}[/]")
            measure(engines, args.rounds, args.wait_idle)
            results[preset] = {k: e for k, (e, _) in engines.items()}
    table = Table(
        title=f"decoding on {device_name(torch.device('cpu'))}, {threads} threads, read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s; medians of {args.rounds} interleaved rounds"
    )
    columns = ("model", "engine", "decode tok/s (B=1)", "vs llama.cpp", "bandwidth")
    for col in (*columns, f"prefill {PREFILL} tok/s", "decode tok/s (B=8)"):
        table.add_column(col, justify="right")
    for preset, engines in results.items():
        for row in rows(preset, engines, bandwidth):
            table.add_row(*row)
    console.print(table)
    for line in targets(results):
        console.print(line)


if __name__ == "__main__":
    main()
