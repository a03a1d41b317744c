"""`tformer generate -m RUN -p PROMPT`: the continuation on stdout, stats on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import typer
from rich.console import Console

from tformer_cli.commands import options
from tformer_cli.commands.console import check_text, pick_model, require_stdin, utf8_problem
from tformer_cli.commands.options import check_max_new_tokens, check_seed
from tformer_cli.errors import TformerError
from tformer_cli.inference.engine import GenerationStats
from tformer_cli.inference.load import (
    check_quantize,
    inference_target,
    load_for_inference,
    model_precision,
)
from tformer_cli.inference.sampling import SamplingConfig
from tformer_cli.inference.text import Completion
from tformer_cli.inference.text import generate as run_generation
from tformer_cli.profiling.fit import require_fit
from tformer_cli.runs.rundir import Run, read_model_config
from tformer_cli.units import human_bytes

EXAMPLES = (
    'tformer generate -p "The Zen of Python" -n 50',
    'tformer generate -m runs/corpus -p "def " -n 100 --temperature 0',
    'tformer generate -m runs/corpus/best/model.safetensors -p "class " --top-p 0.9 --seed 1',
)
MAX_ROWS = 1 << 16  # prompts x --num-samples in one call (memory is checked too, where known)
STDIN_LIMIT = 64 << 20  # bytes of prompt read from stdin; the model sees at most its window anyway


def _read_stdin(err: Console) -> str:
    """The prompt from stdin (UTF-8, STDIN_LIMIT bytes at most), less the newline `echo` adds."""
    require_stdin("give the prompt with -p TEXT or pipe it in")
    if sys.stdin.isatty():
        err.print("[dim]no -p/--prompt: type the prompt, then Ctrl-D[/]")
    text = _stdin_text()
    return text[:-1] if text.endswith("\n") else text


def _stdin_text() -> str:
    too_long = TformerError(
        f"stdin: more than {human_bytes(STDIN_LIMIT)} of prompt; "
        "pipe in less (the model sees only its last context window)"
    )
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text stream without bytes underneath (tests, embedding)
        try:
            text = sys.stdin.read(STDIN_LIMIT + 1)
        except UnicodeDecodeError as e:
            raise TformerError(
                f"stdin: not UTF-8 text ({e.reason}); pipe in UTF-8 text or give -p"
            ) from None
        if len(text) > STDIN_LIMIT:
            raise too_long
        if problem := utf8_problem(text):
            raise TformerError(f"stdin: not UTF-8 text ({problem}); pipe in UTF-8 text or give -p")
        return text
    data = raw.read(STDIN_LIMIT + 1)
    if len(data) > STDIN_LIMIT:
        raise too_long
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TformerError(
            f"stdin: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
            f"{e.start}); pipe in UTF-8 text or give -p"
        ) from None


def prompt_ids(run: Run, text: str, err: Console) -> list[int]:
    """BOS + the prompt's tokens, cut from the left (with a warning) to fit the context window."""
    ids = [run.tokenizer.bos_id, *run.tokenizer.encode(text)]
    window = run.config.max_seq_len
    if len(ids) > window - 1:
        err.print(
            f"[yellow]warning: the prompt has {len(ids)} tokens; keeping its last {window - 1} "
            f"(context window {window})[/]"
        )
        ids = ids[-(window - 1) :]
    return ids


def generate(
    model_dir: Path = options.model(),
    prompt: list[str] = typer.Option(
        None, "-p", "--prompt", help="Prompt text; repeat for a batch (stdin when omitted)."
    ),
    max_new_tokens: int = options.max_new_tokens(200, "Tokens to generate."),
    temperature: float = options.temperature(0.8),
    top_k: int = options.top_k(),
    top_p: float = options.top_p(1.0),
    min_p: float = options.min_p(),
    repetition_penalty: float = options.repetition_penalty(
        1.0, "Penalise tokens already seen (1: off)."
    ),
    stop: list[str] = typer.Option(
        None, "--stop", help="End the text before this string (repeatable)."
    ),
    seed: int = options.seed("The same seed gives the same text."),
    num_samples: int = typer.Option(
        1, "--num-samples", help="Samples per prompt, generated as one batch."
    ),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Recompute the whole context each step (slow; for comparison)."
    ),
    device: str = options.device(),
    precision: str = options.precision(),
    quantize: str = options.quantize(),
    compile_model: bool = options.compile_prefill(),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object with the text, token counts and timings."
    ),
) -> None:
    """Continue a prompt. Only the generated text goes to stdout, so it composes in pipes."""
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty).validate()
    texts = _checked_prompts(prompt, stop, max_new_tokens, seed, num_samples)
    err = Console(stderr=True, soft_wrap=True)
    dev, prec = inference_target(device, precision, quantize)
    check_quantize(quantize, dev, compile_model)
    path = pick_model(model_dir, err)
    prec = model_precision(precision, dev, prec, path)
    texts = texts or [_read_stdin(err)]
    _require_fit(path, texts, num_samples, max_new_tokens, dev, prec)
    run = load_for_inference(path, dev, prec, compile_model, quantize=quantize)
    batch = [t for t in texts for _ in range(num_samples)]
    encoded = [prompt_ids(run, t, err) for t in texts]  # each prompt encoded (and cut) once
    ids = [list(r) for r in encoded for _ in range(num_samples)]
    stream = len(batch) == 1 and not as_json
    stops = tuple(stop or ())
    results, stats = _run(run, ids, sampling, max_new_tokens, stops, no_cache, seed, stream, err)
    if as_json:
        out = _json_report(batch, results, stats, dev, prec, no_cache)
        if quantize != "none":
            out["quantize"] = quantize
        typer.echo(json.dumps(out, ensure_ascii=False))
        return
    _print_texts(results, streamed=stream)
    shown = prec if quantize == "none" else f"{prec} activations, {quantize} weights"
    err.print(_stats_line(stats, dev, shown, no_cache))


def _checked_prompts(
    prompt: list[str] | None,
    stop: list[str] | None,
    max_new_tokens: int,
    seed: int | None,
    num_samples: int,
) -> list[str] | None:
    """The prompts given with -p (None: read stdin), after every check that needs no model."""
    check_max_new_tokens(max_new_tokens)
    check_seed(seed)
    if not 1 <= num_samples <= MAX_ROWS:
        raise TformerError(f"--num-samples must be between 1 and {MAX_ROWS:,}, got {num_samples}")
    texts = [check_text(t, "--prompt") for t in prompt] if prompt else None
    for text in stop or ():
        check_text(text, "--stop")
    rows = (len(texts) if texts else 1) * num_samples
    if rows > MAX_ROWS:
        raise TformerError(
            f"--num-samples {num_samples} x {len(texts or ())} prompts is {rows:,} "
            f"rows; at most {MAX_ROWS:,} go in one call"
        )
    return texts


def _require_fit(
    path: Path,
    texts: list[str],
    num_samples: int,
    max_new_tokens: int,
    device: torch.device,
    precision: str,
) -> None:
    """Will the batch fit? Asked of the memory model before the weights load or a row is built."""
    cfg = read_model_config(path)
    longest = 2 + max(len(t.encode("utf-8")) for t in texts)  # tokens <= bytes + space + BOS
    need = min(cfg.max_seq_len, longest + max_new_tokens)
    if num_samples > 1:
        flag = f"--num-samples {num_samples}"
    else:
        flag = f"{len(texts)} prompts" if len(texts) > 1 else f"--model {path}"
    require_fit("inference", cfg, need, len(texts) * num_samples, precision, device, flag)


def _run(
    run: Run,
    ids: list[list[int]],
    sampling: SamplingConfig,
    max_new_tokens: int,
    stops: tuple[str, ...],
    no_cache: bool,
    seed: int | None,
    stream: bool,
    err: Console,
) -> tuple[list[Completion], GenerationStats]:
    """Generate, a single row's text streamed to stdout as it comes; Ctrl-C exits with 130."""

    def write(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        return run_generation(
            run.model,
            run.tokenizer,
            ids,
            sampling,
            max_new_tokens,
            stops=stops,
            use_cache=not no_cache,
            seed=seed,
            on_text=write if stream else None,
        )
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        err.print("[dim]stopped[/]")
        raise typer.Exit(130) from None


def _json_report(
    batch: list[str],
    results: list[Completion],
    stats: GenerationStats,
    device: torch.device,
    precision: str,
    no_cache: bool,
) -> dict:
    """What --json prints: every row's text and token counts, the first row's at the top."""
    rows = [
        {
            "prompt": p,
            "text": r.text,
            "finish": r.finish,
            "prompt_tokens": len(r.prompt_ids),
            "new_tokens": len(r.ids),
        }
        for p, r in zip(batch, results, strict=True)
    ]
    return {
        "prompt": batch[0],
        "text": results[0].text,
        "rows": rows,
        "device": str(device),
        "precision": precision,
        "cache": not no_cache,
        **stats.to_dict(),
    }


def _print_texts(results: list[Completion], streamed: bool) -> None:
    """The texts on stdout (a streamed one is there already), separated by blank lines."""
    if not streamed:
        sys.stdout.write("\n\n".join(r.text for r in results))
    sys.stdout.write("\n")
    sys.stdout.flush()


def _stats_line(
    stats: GenerationStats, device: torch.device, precision: str, no_cache: bool
) -> str:
    mode = "no cache" if no_cache else "KV cache"
    return (
        f"[dim]{stats.new_tokens} tokens, first after {1000 * stats.prefill_seconds:.0f} ms "
        f"({stats.prompt_tokens} prompt tokens at {stats.prefill_tokens_per_s:,.0f}/s), "
        f"{stats.decode_tokens_per_s:.1f} tokens/s ({device} {precision}, {mode})"
        + (f", window slid {stats.slides}x" if stats.slides else "")
        + "[/]"
    )
