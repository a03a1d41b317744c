"""What `tformer train` and `tformer finetune` share on screen: progress, Ctrl-C, the run card."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tformer_cli.commands.runcard import render_run_card
from tformer_cli.training.budget import UNTIL_FITTED
from tformer_cli.units import human_duration

# A training recipe with everything but its reporting bound: work(on_event=..., stop=...) -> card
Work = Callable[..., dict[str, Any]]


def install_interrupt(stop: threading.Event, console: Console, training: Callable[[], bool]):
    """During training, first Ctrl-C: finish the step, save, exit; second: abort the step (still
    saving the last one). Before training starts (tokenizer, pre-tokenising) there is nothing to
    save: Ctrl-C stops at once, and the start leaves nothing behind."""

    def handler(signum, frame):
        if stop.is_set() or not training():
            raise KeyboardInterrupt
        stop.set()
        console.print(
            "[yellow]stopping after this step and saving a resumable checkpoint "
            "(Ctrl-C again to stop now)[/]"
        )

    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGINT, handler)
    return None


def run_dir_line(d: dict[str, Any]) -> str:
    """Where the run goes, said first, and why there when tformer chose the name."""
    path, how = d["path"], d["how"]
    if how == "resume":
        chosen = " (the latest run of this corpus; choose another with -o)" if d["auto"] else ""
        return f"continuing the run in {path}{chosen}"
    if how == "overwrite":
        return f"training into {path}, replacing the run that was there (--overwrite)"
    if how == "unfinished":
        return f"training into {path}, taking over a start that saved no checkpoint"
    if how == "next":
        return (
            f"training into {path}: {d['previous']} holds an earlier run "
            "(--resume continues the latest one instead; -o chooses the directory)"
        )
    if d["auto"]:
        return f"training into {path} (named after {d['corpus']}; choose another with -o)"
    return f"training into {path}"


class Reporter:
    """Turns the trainer's events into a rich progress bar and log lines on stderr.

    Called as on_event(kind, data); each kind it shows has a method on_<kind>(data), and the
    kinds without one are not shown.
    """

    def __init__(self, console: Console, quiet: bool):
        self.console, self.quiet = console, quiet
        self.progress: Progress | None = None
        self.task = None
        self.loss = float("nan")
        self.training = False  # the loop has started: Ctrl-C then saves a checkpoint first
        self.rate = 0.0

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        getattr(self, f"on_{kind}", lambda d: None)(data)

    def on_run_dir(self, d):
        self.console.print(run_dir_line(d), markup=False, highlight=False)

    def on_tokenizer_start(self, d):
        self.console.print(f"training a {d['vocab_size']}-token tokenizer on the corpus ...")

    def on_tokenizer_done(self, d):
        took = human_duration(d["seconds"])
        self.console.print(f"tokenizer: {d['vocab_size']} tokens in {took}")

    def on_data(self, d):
        if "train_examples" in d:
            cut = f", {d['truncated']} truncated to the window" if d["truncated"] else ""
            self.console.print(
                f"data: {d['train_examples']:,} training and {d['val_examples']:,} validation "
                f"examples{cut}"
            )
            return
        src = "cached" if d["cached"] else "tokenised"
        self.console.print(
            f"data ({src}): {d['train_tokens']:,} training and {d['val_tokens']:,} validation "
            "tokens"
        )

    def on_auto(self, d):
        shape = ", ".join(f"{k} {v}" for k, v in d["model"].items())
        self.console.print(
            f"--preset auto: {d['rung']} ({shape}; lr {d['lr']:g}, batch {d['batch_size']}): "
            f"{d['why']}",
            markup=False,
            highlight=False,
        )

    def on_resumed(self, d):
        self.console.print(f"resuming from step {d['step']}")

    def on_notice(self, d):
        self.console.print(f"[yellow]{d['message']}[/]", highlight=False)

    def on_start(self, d):
        self.training = True
        c = d["config"]
        self.console.print(
            f"model: {d['params']:,} parameters ({c['n_layers']} layers, dim {c['dim']}, "
            f"{c['n_heads']} heads, vocab {c['vocab_size']}); seq-len {d['seq_len']}, "
            f"{d['device']} {d['precision']}"
            + (f", {d['world_size']} processes" if d["world_size"] > 1 else "")
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
        total = d["total_steps"] if d["total_steps"] < UNTIL_FITTED else None
        self.task = self.progress.add_task(
            "train", total=total, completed=d["start_step"], loss=float("nan"), rate=0.0
        )

    def _update(self, step, total, **fields):
        if self.progress is not None:
            self.progress.update(
                self.task, completed=step, total=total if total < UNTIL_FITTED else None, **fields
            )

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
        """Stop the progress bar, leaving its last state on screen."""
        if self.progress is not None:
            self.progress.stop()


def run_with_progress(work: Work, quiet: bool, as_json: bool) -> None:
    """Run work(on_event=..., stop=...) with a progress bar and Ctrl-C handling, then show its
    run card.

    Under torchrun only rank 0 prints. An interrupted run exits with 130 after saying how to resume.
    """
    is_main = int(os.environ.get("RANK", "0")) == 0
    err = Console(stderr=True, quiet=not is_main, soft_wrap=True)
    stop = threading.Event()
    reporter = Reporter(err, quiet or not is_main)
    previous = install_interrupt(stop, err, lambda: reporter.training)
    try:
        card = work(on_event=reporter, stop=stop)
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
        err.print(
            f"interrupted at step {card['steps']}: continue with the same command plus --resume"
        )
        raise typer.Exit(130)
