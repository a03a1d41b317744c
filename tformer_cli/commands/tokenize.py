"""`tformer tokenize`: train, inspect and apply sentencepiece tokenizers; pre-tokenise corpora."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from tformer_cli.errors import TformerError
from tformer_cli.pretokenize import pretokenize
from tformer_cli.tokenizer import load_tokenizer, train_tokenizer

app = typer.Typer(no_args_is_help=True, help="Train, inspect and apply sentencepiece tokenizers.")

_STYLES = ("on grey23", "on dark_blue", "on dark_green", "on dark_red", "on purple4")


@app.command("train")
def train(
    corpus: list[Path] = typer.Argument(..., help="Text files, directories of .txt, or .jsonl with a \"text\" field."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the .model file."),
    vocab_size: int = typer.Option(8000, "--vocab-size", help="Number of tokens."),
    model_type: str = typer.Option("bpe", "--type", help="bpe, unigram or char."),
    character_coverage: float = typer.Option(0.9995, "--character-coverage", help="Share of characters given their own token; the rest use byte fallback."),
    max_sentences: int = typer.Option(2_000_000, "--max-sentences", help="Sample at most this many lines (bounds memory)."),
) -> None:
    """Train a tokenizer on a corpus (byte fallback, split digits, exact whitespace, chat markers)."""
    err = Console(stderr=True)
    with err.status("training the tokenizer ..."):
        summary = train_tokenizer(corpus, output, vocab_size, model_type, character_coverage, max_sentences)
    table = Table(title=f"tokenizer: {summary.path}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("vocab size", f"{summary.vocab_size:,}")
    table.add_row("type", summary.model_type)
    table.add_row("chars per token", f"{summary.chars_per_token:.2f} (held-out lines)")
    table.add_row("time", f"{summary.seconds:.1f}s")
    table.add_row("sha256", summary.sha256[:16])
    Console().print(table)


def _read_text(text: str | None) -> str:
    return sys.stdin.read() if text is None else text


@app.command("encode")
def encode(
    text: str = typer.Argument(None, help="Text to encode (stdin when omitted)."),
    tokenizer: Path = typer.Option(..., "-t", "--tokenizer", help="The tokenizer .model file."),
    ids_only: bool = typer.Option(False, "--ids", help="Print only the ids, space separated."),
    as_json: bool = typer.Option(False, "--json", help="Print ids and pieces as JSON."),
) -> None:
    """Show how text splits into tokens: coloured pieces and their ids."""
    tok = load_tokenizer(tokenizer)
    text = _read_text(text)
    ids = tok.encode(text)
    if ids_only:
        typer.echo(" ".join(map(str, ids)))
        return
    pieces = [tok.id_to_piece(i) for i in ids]
    if as_json:
        typer.echo(json.dumps({"ids": ids, "pieces": pieces, "count": len(ids), "chars": len(text)}, ensure_ascii=False))
        return
    shown = Text()
    for n, piece in enumerate(pieces):
        shown.append(piece.replace("\n", "\\n"), style=_STYLES[n % len(_STYLES)])
    console = Console()
    console.print(shown)
    console.print(" ".join(map(str, ids)), style="dim")
    console.print(f"{len(ids)} tokens, {len(text)} characters", style="dim")


@app.command("decode")
def decode(
    ids: list[str] = typer.Argument(None, help="Token ids (stdin when omitted)."),
    tokenizer: Path = typer.Option(..., "-t", "--tokenizer", help="The tokenizer .model file."),
) -> None:
    """Turn token ids back into text."""
    tok = load_tokenizer(tokenizer)
    words = ids if ids else sys.stdin.read().split()
    try:
        numbers = [int(w) for w in words]
    except ValueError:
        bad = next(w for w in words if not w.lstrip("-").isdigit())
        raise TformerError(f"decode: {bad!r} is not a token id; give integers") from None
    sys.stdout.write(tok.decode(numbers))
    sys.stdout.flush()


@app.command("corpus")
def corpus(
    corpus: list[Path] = typer.Argument(..., help="Text files, directories of .txt, or .jsonl files."),
    tokenizer: Path = typer.Option(..., "-t", "--tokenizer", help="The tokenizer .model file."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory for train.bin, val.bin and meta.json."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share of each file kept for validation."),
) -> None:
    """Pre-tokenise a corpus into token files for training."""
    if not 0 <= val_fraction < 1:
        raise TformerError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    tok = load_tokenizer(tokenizer)
    err = Console(stderr=True)
    with Progress(TextColumn("tokenising"), BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task("tokenise", total=None)
        data = pretokenize(corpus, tok, output, val_fraction,
                           progress=lambda done, total: bar.update(task, completed=done, total=total))
    table = Table(title=f"tokens: {output}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("train", f"{data.train_tokens:,} tokens from {data.train_bytes:,} bytes")
    table.add_row("val", f"{data.val_tokens:,} tokens from {data.val_bytes:,} bytes")
    table.add_row("dtype", data.dtype)
    Console().print(table)
