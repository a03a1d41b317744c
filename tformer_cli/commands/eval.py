"""`tformer eval -m RUN [-m RUN ...] [--data FILE ...]`: bits per byte and perplexity of models
on text, in one table ranked by bits per byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text as RichText

from tformer_cli.commands import options
from tformer_cli.commands.console import pick_model
from tformer_cli.evaluation.compare import EvalSettings, Model, Row, evaluate
from tformer_cli.evaluation.texts import data_text
from tformer_cli.runs.locate import resolve_model_path
from tformer_cli.units import human_bytes

EXAMPLES = (
    "tformer eval -m runs/corpus",
    "tformer eval -m runs/corpus -m runs/chat --data notes.txt",
    "tformer eval -m runs/corpus --quantize none,int8 --data notes.txt --json",
    "tformer eval -m runs/corpus --stride 256",
)


def _unset(flag: str, help: str) -> Any:
    """A whole-number option whose default (None) the help names."""
    return typer.Option(None, flag, help=help)


def eval_command(
    model_dirs: list[Path] = options.model(),
    data: list[Path] = typer.Option(
        None,
        "--data",
        metavar="FILE",
        help='Text to score: .txt, .jsonl with a "text" field, or a folder of them; repeatable '
        "(default: each run's held-out text).",
    ),
    stride: int = _unset(
        "--stride",
        "Tokens between window starts (default: half the window; the window itself scores as "
        "training's eval does).",
    ),
    seq_len: int = _unset("--seq-len", "Tokens per window (default: what the run trained at)."),
    batch_size: int = _unset("--batch-size", "Windows per forward pass (default: by vocabulary)."),
    device: str = options.device(),
    precision: str = options.precision(),
    quantize: str = options.quantize(),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Score models on text: the mean next-token loss over the whole text as nats per token,
    perplexity and bits per byte (comparable across tokenizers). --quantize takes a list
    (none,int8) to score each model both ways."""
    err = Console(stderr=True, soft_wrap=True)
    texts = [data_text(p) for p in data] if data else None  # bad text fails before any loading
    labels = list(dict.fromkeys(model_dirs)) if model_dirs else [pick_model(None, err)]
    models = [Model(str(p), resolve_model_path(p)) for p in labels]
    schemes = list(dict.fromkeys(s.strip() for s in quantize.split(",") if s.strip()))
    settings = EvalSettings(seq_len, stride, batch_size, device, precision)
    reporter = _Reporter(err, quiet or as_json)
    try:
        rows = evaluate(models, texts, settings, schemes or ["none"], reporter)
    finally:
        reporter.close()
    if as_json:
        typer.echo(json.dumps({"results": [r.to_dict() for r in rows]}, indent=2))
        return
    Console().print(results_table(rows))


def results_table(rows: list[Row]) -> Table:
    """One table: a section per text (its name and size first), its models best first (marked)."""
    windows = {(r.score.window, r.score.stride) for r in rows}
    caption = "; ".join(
        f"windows of {w} tokens every {s}: after the first window each token is predicted from "
        f"at least {w - s + 1} tokens of context"
        for w, s in sorted(windows)
    )
    table = Table(caption=caption, caption_justify="left")
    table.add_column("model", overflow="fold", min_width=16)
    for name in ("bits/byte", "nats/token", "perplexity", "tokens", "tokens/s"):
        table.add_column(name, justify="right", no_wrap=True)
    text = None
    for r in rows:
        if r.text != text:
            if text is not None:
                table.add_section()
            size = human_bytes(r.score.bytes)
            table.add_row(RichText(f"{r.text}: {size}", style="italic"), "", "", "", "", "")
        s, text = r.score, r.text
        name = RichText(("★ " if r.best else "  ") + r.name)
        name.append(f" {r.kind}", style="dim")
        table.add_row(
            name,
            f"{s.bits_per_byte:.4f}",
            f"{s.nats_per_token:.4f}",
            f"{s.perplexity:,.2f}",
            f"{s.predicted:,}",
            f"{s.tokens_per_s:,.0f}",
            style="bold" if r.best else None,
        )
    return table


class _Reporter:
    """evaluate()'s events as a progress bar per model and text on stderr (skips said there)."""

    def __init__(self, err: Console, quiet: bool):
        self.err, self.quiet = err, quiet
        self.progress: Progress | None = None
        self.task, self.total = None, 0

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "skipped":
            self.err.print(f"skipped {data['reason']}", markup=False, highlight=False)
        elif kind == "text" and not self.quiet:
            self._start(f"{data['model']} on {data['text']}", data["bytes"])
        elif kind == "progress" and self.progress is not None:
            self.progress.update(self.task, completed=data["done"])
        elif kind == "scored" and self.progress is not None:
            self.progress.update(self.task, completed=self.total)

    def _start(self, what: str, total: int) -> None:
        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TimeRemainingColumn(),
                console=self.err,
                transient=True,
            )
            self.progress.start()
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task, self.total = self.progress.add_task(what, total=total), total

    def close(self) -> None:
        """Take the bar off the screen."""
        if self.progress is not None:
            self.progress.stop()
