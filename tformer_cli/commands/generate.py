"""`tformer generate -m RUN -p PROMPT`: the continuation on stdout, stats on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import typer
from rich.console import Console

from models.decode import prepare_for_inference
from tformer_cli.device import DTYPES, resolve_device, resolve_precision
from tformer_cli.errors import TformerError
from tformer_cli.inference.engine import generate as run_generation
from tformer_cli.inference.sampling import SamplingConfig
from tformer_cli.profiling.fit import require_fit
from tformer_cli.runs.locate import find_model
from tformer_cli.runs.rundir import load_run, read_model_config

EXAMPLES = (
    'tformer generate -p "The Zen of Python" -n 50',
    'tformer generate -m runs/corpus -p "def " -n 100 --temperature 0',
    'tformer generate -m runs/corpus/best/model.safetensors -p "class " --top-p 0.9 --seed 1',
)
MAX_NEW_TOKENS = 1_000_000  # -n beyond this is a typo, not a request (the window slides anyway)
MAX_ROWS = 1 << 16  # prompts x --num-samples in one call (memory is checked too, where known)
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
STDIN_LIMIT = 64 << 20  # bytes of prompt read from stdin; the model sees at most its window anyway
MODEL_HELP = (
    "A run directory, its best/, a model.safetensors inside either, or a Hugging Face Llama "
    "directory (default: the newest run under ./runs)."
)


def pick_model(model_dir: Path | None, err: Console) -> Path:
    """The directory --model names; without it the newest run under ./runs, said on stderr."""
    path, chosen = find_model(model_dir)
    if chosen:
        err.print(
            f"using {path} (the most recently trained run; choose another with -m)",
            markup=False,
            highlight=False,
        )
    return path


def load_for_inference(model_dir: Path, device: str, precision: str, compile_model: bool):
    """The run on the chosen device, its weights cast (not autocast) to the chosen precision."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev, job="inference")
    run = load_run(model_dir, device=dev, dtype=DTYPES[prec])
    prepare_for_inference(run.model)
    if compile_model:
        # prefill and --no-cache go through model.hidden; the fused decode step stays eager
        # (compiled, it re-specialises on every cache slot and ran slower on a CPU)
        run.model.hidden = torch.compile(run.model.hidden, dynamic=True)
    return run, dev, prec


def utf8_problem(text: str) -> str | None:
    """Why text cannot be written as UTF-8 (bytes that were not UTF-8 arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        byte = 0xDC80 <= ch <= 0xDCFF  # how surrogateescape carries a byte that is not UTF-8
        what = f"byte 0x{ch - 0xDC00:02x}" if byte else f"lone surrogate U+{ch:04X}"
        return f"{what} at character {e.start + 1}"
    return None


def check_text(text: str, what: str) -> str:
    """text, or a TformerError saying that what (e.g. "--prompt") is not valid UTF-8 text."""
    problem = utf8_problem(text)
    if problem:
        raise TformerError(f"{what} is not valid UTF-8 text ({problem}); give UTF-8 text")
    return text


def check_seed(seed: int | None, flag: str = "--seed", most: int = MAX_SEED) -> int | None:
    """seed, or a TformerError when it is outside what a torch.Generator takes (0..most)."""
    if seed is not None and not 0 <= seed <= most:
        raise TformerError(f"{flag} must be between 0 and {most:,}, got {seed}")
    return seed


def check_max_new_tokens(n: int, flag: str = "-n/--max-new-tokens") -> int:
    """n, or a TformerError when it is below 1 or above MAX_NEW_TOKENS."""
    if not 1 <= n <= MAX_NEW_TOKENS:
        raise TformerError(f"{flag} must be between 1 and {MAX_NEW_TOKENS:,}, got {n}")
    return n


def require_stdin(why: str) -> None:
    """A TformerError when the process has no stdin at all (started with it closed: `<&-`)."""
    stdin = sys.stdin
    try:
        usable = stdin is not None and not stdin.closed
    except (AttributeError, ValueError):
        usable = False
    if not usable:
        raise TformerError(f"stdin is closed; {why}")


def _read_stdin(err: Console) -> str:
    """The prompt from stdin (UTF-8, STDIN_LIMIT bytes at most), less the newline `echo` adds."""
    require_stdin("give the prompt with -p TEXT or pipe it in")
    if sys.stdin.isatty():
        err.print("[dim]no -p/--prompt: type the prompt, then Ctrl-D[/]")
    raw = getattr(sys.stdin, "buffer", None)
    if raw is not None:
        data = raw.read(STDIN_LIMIT + 1)
        if len(data) > STDIN_LIMIT:
            raise TformerError(
                f"stdin: more than {STDIN_LIMIT >> 20} MB of prompt; "
                "pipe in less (the model sees only its last context window)"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TformerError(
                f"stdin: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                f"{e.start}); pipe in UTF-8 text or give -p"
            ) from None
    else:  # a text stream without bytes underneath (tests, embedding)
        try:
            text = sys.stdin.read(STDIN_LIMIT + 1)
        except UnicodeDecodeError as e:
            raise TformerError(
                f"stdin: not UTF-8 text ({e.reason}); pipe in UTF-8 text or give -p"
            ) from None
        if len(text) > STDIN_LIMIT:
            raise TformerError(
                f"stdin: more than {STDIN_LIMIT >> 20} MB of prompt; "
                "pipe in less (the model sees only its last context window)"
            )
        if problem := utf8_problem(text):
            raise TformerError(f"stdin: not UTF-8 text ({problem}); pipe in UTF-8 text or give -p")
    return text[:-1] if text.endswith("\n") else text


def prompt_ids(run, text: str, err: Console) -> list[int]:
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
    model_dir: Path = typer.Option(None, "-m", "--model", metavar="RUN_DIR", help=MODEL_HELP),
    prompt: list[str] = typer.Option(
        None, "-p", "--prompt", help="Prompt text; repeat for a batch (stdin when omitted)."
    ),
    max_new_tokens: int = typer.Option(200, "-n", "--max-new-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature", help="0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(
        1.0, "--top-p", help="Keep the smallest set with this much probability (1: off)."
    ),
    min_p: float = typer.Option(
        0.0, "--min-p", help="Drop tokens below min-p x the top probability (0: off)."
    ),
    repetition_penalty: float = typer.Option(
        1.0, "--repetition-penalty", help="Penalise tokens already seen (1: off)."
    ),
    stop: list[str] = typer.Option(
        None, "--stop", help="End the text before this string (repeatable)."
    ),
    seed: int = typer.Option(None, "--seed", help="The same seed gives the same text."),
    num_samples: int = typer.Option(
        1, "--num-samples", help="Samples per prompt, generated as one batch."
    ),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Recompute the whole context each step (slow; for comparison)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16."),
    compile_model: bool = typer.Option(
        False, "--compile", help="torch.compile the prefill (slow to start; for GPUs)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object with the text, token counts and timings."
    ),
) -> None:
    """Continue a prompt. Only the generated text goes to stdout, so it composes in pipes."""
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty).validate()
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
    err = Console(stderr=True, soft_wrap=True)
    path = pick_model(model_dir, err)
    if texts is None:
        texts = [_read_stdin(err)]
    # Will the batch fit? Asked of the memory model before the weights load or any row is built.
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev, job="inference")
    cfg = read_model_config(path)
    longest = 2 + max(len(t.encode("utf-8")) for t in texts)  # tokens <= bytes + space + BOS
    need = min(cfg.max_seq_len, longest + max_new_tokens)
    flag = (
        f"--num-samples {num_samples}"
        if num_samples > 1
        else f"{len(texts)} prompts"
        if len(texts) > 1
        else f"--model {path}"
    )
    require_fit("inference", cfg, need, rows, prec, dev, flag)
    run, dev, prec = load_for_inference(path, device, precision, compile_model)
    prompt_rows = [prompt_ids(run, t, err) for t in texts]  # each prompt encoded (and cut) once
    batch = [t for t in texts for _ in range(num_samples)]
    ids = [list(r) for r in prompt_rows for _ in range(num_samples)]
    single = len(batch) == 1 and not as_json

    def stream(row: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        results, stats = run_generation(
            run.model,
            run.tokenizer,
            ids,
            sampling,
            max_new_tokens,
            stops=tuple(stop or ()),
            use_cache=not no_cache,
            seed=seed,
            on_text=stream if single else None,
        )
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        err.print("[dim]stopped[/]")
        raise typer.Exit(130) from None
    if as_json:
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
        out = {
            "prompt": batch[0],
            "text": results[0].text,
            "rows": rows,
            "device": str(dev),
            "precision": prec,
            "cache": not no_cache,
            **stats.to_dict(),
        }
        typer.echo(json.dumps(out, ensure_ascii=False))
        return
    if single:
        sys.stdout.write("\n")
    else:
        for n, r in enumerate(results):
            if n:
                sys.stdout.write("\n\n")
            sys.stdout.write(r.text)
        sys.stdout.write("\n")
    sys.stdout.flush()
    err.print(
        f"[dim]{stats.new_tokens} tokens, first after {1000 * stats.prefill_seconds:.0f} ms "
        f"({stats.prompt_tokens} prompt tokens at {stats.prefill_tokens_per_s:,.0f}/s), "
        f"{stats.decode_tokens_per_s:.1f} tokens/s ({dev} {prec}, {'no cache' if no_cache else 'KV cache'})"
        + (f", window slid {stats.slides}x" if stats.slides else "")
        + "[/]"
    )
