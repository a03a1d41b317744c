"""`tformer import HF_DIR -o RUN_DIR`: a local Hugging Face Llama checkpoint as a tformer run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from tformer_cli.interop.hf_import import import_hf

EXAMPLES = (
    "tformer import ~/models/TinyLlama-1.1B -o runs/tinyllama",
    "tformer import llama-hf/ -o runs/llama --overwrite",
)


def import_command(
    hf_dir: Path = typer.Argument(
        ...,
        metavar="HF_DIR",
        help="A local Hugging Face Llama directory: config.json, *.safetensors, tokenizer.model.",
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", metavar="RUN_DIR", help="The run directory to create."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
) -> None:
    """Import a local Hugging Face Llama checkpoint, so finetune, chat, generate and profile work on it."""  # noqa: E501 - --help shows the docstring line as written
    result = import_hf(hf_dir, output, overwrite)
    console = Console()
    console.print(
        f"imported {hf_dir} ({result.source_dtype} weights, stored as float32): "
        f"{result.params:,} parameters, vocab {result.vocab_size:,}"
    )
    if not result.has_chat_markers:
        console.print(
            "its tokenizer has no tformer chat markers: `tformer chat` uses a plain transcript "
            "and `tformer finetune` takes text data only",
            style="dim",
        )
    console.print(f"wrote {result.path}")
