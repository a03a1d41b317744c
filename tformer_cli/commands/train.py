"""`tformer train CORPUS... [-o RUN_DIR]`: from raw text to a model, with progress and a run
card."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import typer

from tformer_cli.commands import options
from tformer_cli.commands.progress import run_with_progress
from tformer_cli.data.pretokenize import default_cache_dir
from tformer_cli.training.config import config_flags, load_train_config, parse_duration
from tformer_cli.training.pretrain import train as run_training

EXAMPLES = (
    "tformer train corpus.txt",
    "tformer train corpus.txt --time 10m --preset tiny",
    "tformer train corpus.txt -o runs/ten-min --resume",
)


def _unset(flag: str, help: str, **kwargs: Any) -> Any:
    """An option whose default is "not given": the --config file's value, else TrainConfig's."""
    return typer.Option(None, flag, help=help, **kwargs)


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
        help="The run directory to write "
        "(default: runs/<corpus name>, or the next free runs/<name>-N).",
    ),
    preset: str = _unset(
        "--preset",
        "Model shape: nano, micro (the default without --time), tiny, small, small-gqa, gpt2, "
        "or auto (the default with --time: the shape, lr and batch the budget buys here).",
        metavar="NAME",
    ),
    config: Path = _unset(
        "--config",
        "A TOML file with \\[train] and \\[model] tables; flags override it.",
        metavar="FILE",
    ),
    tokenizer: Path = typer.Option(
        None,
        "--tokenizer",
        "-t",
        metavar="FILE",
        help="Use this tokenizer.model instead of training one.",
    ),
    vocab_size: int = _unset("--vocab-size", "Size of the tokenizer trained for this run."),
    max_steps: int = _unset(
        "--max-steps", "Optimizer steps (default 1000 unless --time is given)."
    ),
    time_budget: str = _unset(
        "--time",
        "Wall-clock budget, e.g. 90s, 10m: stops, evaluates and saves on time.",
        metavar="DURATION",
    ),
    batch_size: int = _unset(
        "--batch-size", "Sequences per optimizer step, over all processes (default 16)."
    ),
    grad_accum: int = _unset("--grad-accum", "Split each step into this many micro-batches."),
    seq_len: int = _unset("--seq-len", "Tokens per sequence (default: the context, at most 256)."),
    lr: float = _unset("--lr", "Peak learning rate (default 1e-3)."),
    min_lr: float = _unset("--min-lr", "Final learning rate (default lr/10)."),
    warmup: int = _unset("--warmup", "Warmup steps (default 5% of the steps)."),
    weight_decay: float = _unset("--weight-decay", "AdamW weight decay on matrices (default 0.1)."),
    grad_clip: float = _unset("--grad-clip", "Clip the gradient norm (default 1.0)."),
    dropout: float = _unset("--dropout", "Dropout probability (default: the preset's, 0)."),
    precision: str = _unset(
        "--precision", "auto, fp32, bf16 or fp16 (auto: fastest correct for the device)."
    ),
    device: str = _unset("--device", "auto, cpu, cuda or mps."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Shard the model with FSDP under torchrun."),
    seed: int = _unset("--seed", "Random seed (default 1337)."),
    eval_every: int = _unset("--eval-every", "Evaluate every N steps (default 100)."),
    eval_batches: int = _unset("--eval-batches", "Validation batches per eval (default 20)."),
    save_every: int = _unset("--save-every", "Checkpoint every N steps (default 500)."),
    log_every: int = _unset("--log-every", "Log to metrics.jsonl every N steps (default 10)."),
    sample_every: int = _unset(
        "--sample-every", "Print a sample every N steps (default: at evals; 0: never)."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run in -o (default: the latest run of this corpus) "
        "from its last checkpoint.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing run in -o (default: runs/<corpus name>)."
    ),
    cache_dir: Path = _unset(
        "--cache-dir",
        "Where tokenised corpora are cached (default ~/.cache/tformer).",
        metavar="DIR",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the run card as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    quantize: str = options.refuse_quantize(),
) -> None:
    """Train a model on a text corpus: tokenizer, tokens, model, checkpoints, run card."""
    flags = config_flags(
        locals(),
        tokenizer=str(tokenizer) if tokenizer else None,
        time=parse_duration(time_budget) if time_budget else None,
        compile=compile_model or None,
        fsdp=fsdp or None,
    )
    cfg = load_train_config(config, flags)
    cache_dir = cache_dir or default_cache_dir()
    how = dict(resume=resume, overwrite=overwrite, sampler=_default_sampler())
    run_with_progress(partial(run_training, cfg, corpus, output, cache_dir, **how), quiet, as_json)


def _default_sampler():
    """A short sample at evals, so a CPU user sees the model learn."""
    from tformer_cli.inference.text import sample_text

    return lambda model, tok: sample_text(
        model, tok, max_new_tokens=80, temperature=0.8, top_k=40, seed=0
    )
