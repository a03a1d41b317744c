"""`tformer train CORPUS... -o RUN_DIR`: from raw text to a model, with progress and a run card."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tformer_cli.pretokenize import default_cache_dir
from tformer_cli.runcard import render_run_card
from tformer_cli.train_config import load_train_config, parse_duration
from tformer_cli.trainer import train as run_training


def _install_interrupt(stop: threading.Event, console: Console):
    """First Ctrl-C: finish the step, save, exit. Second: abort the step (still saving the last one)."""

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        console.print("[yellow]stopping after this step and saving a resumable checkpoint "
                      "(Ctrl-C again to stop now)[/]")

    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGINT, handler)
    return None


class _Reporter:
    """Turns the trainer's events into a rich progress bar and log lines on stderr."""

    def __init__(self, console: Console, quiet: bool):
        self.console, self.quiet = console, quiet
        self.progress: Progress | None = None
        self.task = None
        self.loss = float("nan")
        self.rate = 0.0

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        getattr(self, f"on_{kind}", lambda d: None)(data)

    def on_tokenizer_start(self, d):
        self.console.print(f"training a {d['vocab_size']}-token tokenizer on the corpus ...")

    def on_tokenizer_done(self, d):
        self.console.print(f"tokenizer: {d['vocab_size']} tokens in {d['seconds']:.1f}s")

    def on_data(self, d):
        if "train_examples" in d:
            cut = f", {d['truncated']} truncated to the window" if d["truncated"] else ""
            self.console.print(f"data: {d['train_examples']:,} training and {d['val_examples']:,} validation examples{cut}")
            return
        src = "cached" if d["cached"] else "tokenised"
        self.console.print(f"data ({src}): {d['train_tokens']:,} training and {d['val_tokens']:,} validation tokens")

    def on_resumed(self, d):
        self.console.print(f"resuming from step {d['step']}")

    def on_start(self, d):
        c = d["config"]
        self.console.print(
            f"model: {d['params']:,} parameters ({c['n_layers']} layers, dim {c['dim']}, "
            f"{c['n_heads']} heads, vocab {c['vocab_size']}); seq-len {d['seq_len']}, "
            f"{d['device']} {d['precision']}" + (f", {d['world_size']} processes" if d["world_size"] > 1 else "")
        )
        if self.quiet:
            return
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:,.0f} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        total = d["total_steps"] if d["total_steps"] < 10**9 else None
        self.task = self.progress.add_task("train", total=total, completed=d["start_step"], loss=float("nan"), rate=0.0)

    def _update(self, step, total, **fields):
        if self.progress is not None:
            self.progress.update(self.task, completed=step, total=total if total < 10**9 else None, **fields)

    def on_tick(self, d):
        self._update(d["step"], d["total_steps"])

    def on_step(self, d):
        self.loss, self.rate = d["loss"], d["tokens_per_s"]
        self._update(d["step"], d["total_steps"], loss=d["loss"], rate=d["tokens_per_s"])

    def on_schedule(self, d):
        self._update(self.progress.tasks[0].completed if self.progress else 0, d["total_steps"])

    def on_eval(self, d):
        bpb = f", {d['val_bpb']:.3f} bits/byte" if d["val_bpb"] is not None else ""
        self.console.print(f"step {d['step']}: val loss {d['val_loss']:.4f}{bpb}")

    def on_sample(self, d):
        self.console.print(f"[dim]sample at step {d['step']}:[/]\n[cyan]{d['text']}[/]")

    def close(self):
        if self.progress is not None:
            self.progress.stop()


def train(
    corpus: list[Path] = typer.Argument(..., help="Text files, directories of .txt, or .jsonl with a \"text\" field."),
    output: Path = typer.Option(..., "-o", "--output", help="The run directory to write."),
    preset: str = typer.Option(None, "--preset", help="Model shape: nano, micro (default), tiny, small, small-gqa, gpt2."),
    config: Path = typer.Option(None, "--config", help="A TOML file with [train] and [model] tables; flags override it."),
    tokenizer: Path = typer.Option(None, "--tokenizer", "-t", help="Use this tokenizer.model instead of training one."),
    vocab_size: int = typer.Option(None, "--vocab-size", help="Size of the tokenizer trained for this run."),
    max_steps: int = typer.Option(None, "--max-steps", help="Optimizer steps (default 1000 unless --time is given)."),
    time_budget: str = typer.Option(None, "--time", help="Wall-clock budget, e.g. 90s, 10m: stops, evaluates and saves on time."),
    batch_size: int = typer.Option(None, "--batch-size", help="Sequences per optimizer step, over all processes (default 16)."),
    grad_accum: int = typer.Option(None, "--grad-accum", help="Split each step into this many micro-batches."),
    seq_len: int = typer.Option(None, "--seq-len", help="Tokens per sequence (default: the context, at most 256)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default 1e-3)."),
    min_lr: float = typer.Option(None, "--min-lr", help="Final learning rate (default lr/10)."),
    warmup: int = typer.Option(None, "--warmup", help="Warmup steps (default 5% of the steps)."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay on matrices (default 0.1)."),
    grad_clip: float = typer.Option(None, "--grad-clip", help="Clip the gradient norm (default 1.0)."),
    dropout: float = typer.Option(None, "--dropout", help="Dropout probability (default: the preset's, 0)."),
    precision: str = typer.Option(None, "--precision", help="auto, fp32, bf16 or fp16 (auto: fastest correct for the device)."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda or mps."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Shard the model with FSDP under torchrun."),
    seed: int = typer.Option(None, "--seed", help="Random seed (default 1337)."),
    eval_every: int = typer.Option(None, "--eval-every", help="Evaluate every N steps (default 100)."),
    eval_batches: int = typer.Option(None, "--eval-batches", help="Validation batches per eval (default 20)."),
    save_every: int = typer.Option(None, "--save-every", help="Checkpoint every N steps (default 500)."),
    log_every: int = typer.Option(None, "--log-every", help="Log to metrics.jsonl every N steps (default 10)."),
    sample_every: int = typer.Option(None, "--sample-every", help="Print a sample every N steps (default: at evals; 0: never)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in -o from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in -o."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Where tokenised corpora are cached (default ~/.cache/tformer)."),
    as_json: bool = typer.Option(False, "--json", help="Print the run card as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train a model on a text corpus: tokenizer, tokens, model, checkpoints, run card."""
    flags = dict(
        preset=preset, tokenizer=str(tokenizer) if tokenizer else None, vocab_size=vocab_size,
        max_steps=max_steps, time=parse_duration(time_budget) if time_budget else None,
        batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr, min_lr=min_lr,
        warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip, dropout=dropout,
        precision=precision, device=device, compile=compile_model or None, fsdp=fsdp or None,
        seed=seed, eval_every=eval_every, eval_batches=eval_batches, save_every=save_every,
        log_every=log_every, sample_every=sample_every,
    )
    cfg = load_train_config(config, flags)
    is_main = int(os.environ.get("RANK", "0")) == 0
    err = Console(stderr=True, quiet=not is_main, soft_wrap=True)
    stop = threading.Event()
    previous = _install_interrupt(stop, err)
    reporter = _Reporter(err, quiet or not is_main)
    try:
        card = run_training(
            cfg, corpus, output, cache_dir or default_cache_dir(), resume=resume, overwrite=overwrite,
            on_event=reporter, stop=stop, sampler=_default_sampler(),
        )
    finally:
        reporter.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if not is_main:
        return
    if as_json:
        typer.echo(json.dumps(card, indent=2))
    else:
        render_run_card(card, Console())
    if card["interrupted"]:
        err.print(f"interrupted at step {card['steps']}: continue with the same command plus --resume")
        raise typer.Exit(130)


def _default_sampler():
    """A short sample at evals, so a CPU user sees the model learn."""
    from tformer_cli.generation import sample_text

    return lambda model, tok: sample_text(model, tok, max_new_tokens=80, temperature=0.8, top_k=40, seed=0)
