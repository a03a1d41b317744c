"""`tformer tokenize`: train, inspect and apply sentencepiece tokenizers; pre-tokenise corpora."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from tformer_cli.commands.help import TformerCommand, TformerGroup, examples
from tformer_cli.data.pretokenize import pretokenize
from tformer_cli.data.tokenizer import load_tokenizer, train_tokenizer
from tformer_cli.errors import TformerError

# What `tformer tokenize` alone prints under its help: the first thing to type, then the next.
QUICKSTART = (
    "tformer tokenize train corpus.txt -o tok.model --vocab-size 2048",
    'tformer tokenize encode -t tok.model "Hello, world"',
    "tformer tokenize corpus corpus.txt -t tok.model -o tokens/",
)
TRAIN_EXAMPLES = (
    "tformer tokenize train corpus.txt -o tok.model --vocab-size 2048",
    "tformer tokenize train books/ -o tok.model --vocab-size 8000 --type unigram",
    "tformer tokenize train data.jsonl -o tok.model --vocab-size 32000 --max-sentences 500000",
)
ENCODE_EXAMPLES = (
    'tformer tokenize encode -t tok.model "To be, or not to be"',
    'tformer tokenize encode -t tok.model --ids "To be"',
    "tformer tokenize encode -t runs/corpus --json notes",
)
DECODE_EXAMPLES = (
    "tformer tokenize decode -t tok.model 1 410 62 2",
    "tformer tokenize decode -t runs/corpus 72 101",
)
CORPUS_EXAMPLES = (
    "tformer tokenize corpus corpus.txt -t tok.model -o tokens/",
    "tformer tokenize corpus books/ -t runs/corpus -o tokens/ --val-fraction 0.05",
)

app = typer.Typer(
    cls=TformerGroup,
    no_args_is_help=True,
    help="Train, inspect and apply sentencepiece tokenizers.",
    epilog=examples(QUICKSTART, "Start here"),
)

_STYLES = ("on grey23", "on dark_blue", "on dark_green", "on dark_red", "on purple4")
_VISIBLE = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})  # so every piece has a width


@app.command("train", cls=TformerCommand, epilog=examples(TRAIN_EXAMPLES))
def train(
    corpus: list[Path] = typer.Argument(
        ..., help='Text files, directories of .txt, or .jsonl with a "text" field.'
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the .model file."),
    vocab_size: int = typer.Option(8000, "--vocab-size", help="Number of tokens."),
    model_type: str = typer.Option("bpe", "--type", help="bpe, unigram or char."),
    character_coverage: float = typer.Option(
        0.9995,
        "--character-coverage",
        help="Share of characters given their own token; the rest use byte fallback.",
    ),
    max_sentences: int = typer.Option(
        2_000_000, "--max-sentences", help="Sample at most this many lines (bounds memory)."
    ),
) -> None:
    """Train a tokenizer on a corpus (byte fallback, split digits, exact whitespace, chat markers)."""  # noqa: E501 - --help shows the docstring line as written
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    err = Console(stderr=True)
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("reading corpus", total=None)

        def on_progress(done: int, total: int) -> None:
            # sentencepiece reads (and samples) the whole corpus first, then trains silently
            label = "training" if done >= total else "reading corpus"
            bar.update(task, description=label, completed=done, total=total)

        summary = train_tokenizer(
            corpus,
            output,
            vocab_size,
            model_type,
            character_coverage,
            max_sentences,
            progress=on_progress,
        )
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
    """TEXT as given, else all of stdin (as UTF-8, exactly: no newline translation)."""
    if text is not None:
        return text
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text stream (as in tests): already decoded
        return sys.stdin.read()
    data = raw.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TformerError(
            f"stdin: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None


@app.command("encode", cls=TformerCommand, epilog=examples(ENCODE_EXAMPLES))
def encode(
    text: str = typer.Argument(None, help="Text to encode (stdin when omitted)."),
    tokenizer: Path = typer.Option(
        ...,
        "-t",
        "--tokenizer",
        metavar="FILE",
        help="The tokenizer .model file (or a run directory holding one).",
    ),
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
        typer.echo(
            json.dumps(
                {"ids": ids, "pieces": pieces, "count": len(ids), "chars": len(text)},
                ensure_ascii=False,
            )
        )
        return
    shown = Text()
    for n, piece in enumerate(pieces):
        shown.append(piece.translate(_VISIBLE), style=_STYLES[n % len(_STYLES)])
    console = Console()
    console.print(shown)
    console.print(" ".join(map(str, ids)), style="dim")
    console.print(f"{len(ids)} tokens, {len(text)} characters", style="dim")


def _token_id(word: str) -> int:
    try:
        return int(word)
    except ValueError:
        raise TformerError(f"decode: {word!r} is not a token id; give integers") from None


# ignore_unknown_options: a negative id such as -1 is an id to reject, not an unknown option.
@app.command(
    "decode",
    cls=TformerCommand,
    epilog=examples(DECODE_EXAMPLES),
    context_settings={"ignore_unknown_options": True},
)
def decode(
    ids: list[str] = typer.Argument(None, help="Token ids (stdin when omitted)."),
    tokenizer: Path = typer.Option(
        ...,
        "-t",
        "--tokenizer",
        metavar="FILE",
        help="The tokenizer .model file (or a run directory holding one).",
    ),
) -> None:
    """Turn token ids back into text, exactly (`encode --ids | decode` gives the text back)."""
    tok = load_tokenizer(tokenizer)
    words = ids if ids else sys.stdin.read().split()
    text = tok.decode([_token_id(w) for w in words])
    if sys.stdout.isatty() and not text.endswith("\n"):
        text += "\n"  # only for the terminal's prompt; a pipe gets the text exactly
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command("corpus", cls=TformerCommand, epilog=examples(CORPUS_EXAMPLES))
def corpus(
    corpus: list[Path] = typer.Argument(
        ..., help="Text files, directories of .txt, or .jsonl files."
    ),
    tokenizer: Path = typer.Option(
        ...,
        "-t",
        "--tokenizer",
        metavar="FILE",
        help="The tokenizer .model file (or a run directory holding one).",
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", help="Directory for train.bin, val.bin and meta.json."
    ),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", help="Share of each file kept for validation."
    ),
) -> None:
    """Pre-tokenise a corpus into token files for training."""
    if not 0 <= val_fraction < 1:
        raise TformerError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    tok = load_tokenizer(tokenizer)
    err = Console(stderr=True)
    columns = (TextColumn("tokenising"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("tokenise", total=None)
        data = pretokenize(
            corpus,
            tok,
            output,
            val_fraction,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    table = Table(title=f"tokens: {output}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("train", f"{data.train_tokens:,} tokens from {data.train_bytes:,} bytes")
    table.add_row("val", f"{data.val_tokens:,} tokens from {data.val_bytes:,} bytes")
    table.add_row("dtype", data.dtype)
    Console().print(table)
