"""`tformer train CORPUS... [-o RUN_DIR]`: from raw text to a model, with progress and a run card."""

from __future__ import annotations

from pathlib import Path

import typer

from tformer_cli.commands.progress import run_with_progress
from tformer_cli.data.pretokenize import default_cache_dir
from tformer_cli.training.config import load_train_config, parse_duration
from tformer_cli.training.pretrain import train as run_training

EXAMPLES = (
    "tformer train corpus.txt",
    "tformer train corpus.txt --time 10m --preset tiny",
    "tformer train corpus.txt -o runs/ten-min --resume",
)


def train(
    corpus: list[Path] = typer.Argument(
        ...,
        metavar="CORPUS",
        help='Text files, directories of .txt, or .jsonl with a "text" field.',
    ),
    output: Path = typer.Option(
        None,
        "-o",
        "--output",
        metavar="RUN_DIR",
        help="The run directory to write (default: runs/<corpus name>, or the next free runs/<name>-N).",
    ),
    preset: str = typer.Option(
        None,
        "--preset",
        metavar="NAME",
        help="Model shape: nano, micro (default), tiny, small, small-gqa, gpt2.",
    ),
    config: Path = typer.Option(
        None,
        "--config",
        metavar="FILE",
        help="A TOML file with \\[train] and \\[model] tables; flags override it.",
    ),
    tokenizer: Path = typer.Option(
        None,
        "--tokenizer",
        "-t",
        metavar="FILE",
        help="Use this tokenizer.model instead of training one.",
    ),
    vocab_size: int = typer.Option(
        None, "--vocab-size", help="Size of the tokenizer trained for this run."
    ),
    max_steps: int = typer.Option(
        None, "--max-steps", help="Optimizer steps (default 1000 unless --time is given)."
    ),
    time_budget: str = typer.Option(
        None,
        "--time",
        metavar="DURATION",
        help="Wall-clock budget, e.g. 90s, 10m: stops, evaluates and saves on time.",
    ),
    batch_size: int = typer.Option(
        None, "--batch-size", help="Sequences per optimizer step, over all processes (default 16)."
    ),
    grad_accum: int = typer.Option(
        None, "--grad-accum", help="Split each step into this many micro-batches."
    ),
    seq_len: int = typer.Option(
        None, "--seq-len", help="Tokens per sequence (default: the context, at most 256)."
    ),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default 1e-3)."),
    min_lr: float = typer.Option(None, "--min-lr", help="Final learning rate (default lr/10)."),
    warmup: int = typer.Option(None, "--warmup", help="Warmup steps (default 5% of the steps)."),
    weight_decay: float = typer.Option(
        None, "--weight-decay", help="AdamW weight decay on matrices (default 0.1)."
    ),
    grad_clip: float = typer.Option(
        None, "--grad-clip", help="Clip the gradient norm (default 1.0)."
    ),
    dropout: float = typer.Option(
        None, "--dropout", help="Dropout probability (default: the preset's, 0)."
    ),
    precision: str = typer.Option(
        None, "--precision", help="auto, fp32, bf16 or fp16 (auto: fastest correct for the device)."
    ),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda or mps."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Shard the model with FSDP under torchrun."),
    seed: int = typer.Option(None, "--seed", help="Random seed (default 1337)."),
    eval_every: int = typer.Option(
        None, "--eval-every", help="Evaluate every N steps (default 100)."
    ),
    eval_batches: int = typer.Option(
        None, "--eval-batches", help="Validation batches per eval (default 20)."
    ),
    save_every: int = typer.Option(
        None, "--save-every", help="Checkpoint every N steps (default 500)."
    ),
    log_every: int = typer.Option(
        None, "--log-every", help="Log to metrics.jsonl every N steps (default 10)."
    ),
    sample_every: int = typer.Option(
        None, "--sample-every", help="Print a sample every N steps (default: at evals; 0: never)."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in -o (default: the latest run of this corpus) from its last checkpoint.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing run in -o (default: runs/<corpus name>)."
    ),
    cache_dir: Path = typer.Option(
        None,
        "--cache-dir",
        metavar="DIR",
        help="Where tokenised corpora are cached (default ~/.cache/tformer).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the run card as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train a model on a text corpus: tokenizer, tokens, model, checkpoints, run card."""
    flags = dict(
        preset=preset,
        tokenizer=str(tokenizer) if tokenizer else None,
        vocab_size=vocab_size,
        max_steps=max_steps,
        time=parse_duration(time_budget) if time_budget else None,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seq_len=seq_len,
        lr=lr,
        min_lr=min_lr,
        warmup=warmup,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        dropout=dropout,
        precision=precision,
        device=device,
        compile=compile_model or None,
        fsdp=fsdp or None,
        seed=seed,
        eval_every=eval_every,
        eval_batches=eval_batches,
        save_every=save_every,
        log_every=log_every,
        sample_every=sample_every,
    )
    cfg = load_train_config(config, flags)
    run_with_progress(
        lambda on_event, stop: run_training(
            cfg,
            corpus,
            output,
            cache_dir or default_cache_dir(),
            resume=resume,
            overwrite=overwrite,
            on_event=on_event,
            stop=stop,
            sampler=_default_sampler(),
        ),
        quiet,
        as_json,
    )


def _default_sampler():
    """A short sample at evals, so a CPU user sees the model learn."""
    from tformer_cli.inference.engine import sample_text

    return lambda model, tok: sample_text(
        model, tok, max_new_tokens=80, temperature=0.8, top_k=40, seed=0
    )
