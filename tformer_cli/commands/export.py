"""`tformer export RUN_DIR --format hf|gguf -o OUT`: take a model to other tools."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from tformer_cli.errors import TformerError
from tformer_cli.interop.gguf_export import GGUF_TYPES, export_gguf
from tformer_cli.interop.hf_export import export_hf

FORMATS = ("hf", "gguf")
EXAMPLES = (
    "tformer export runs/corpus --format hf -o corpus-hf",
    "tformer export runs/corpus/best --format gguf -o corpus.gguf --type q8_0",
    "tformer export runs/chat/adapter.safetensors --format hf -o chat-hf --overwrite",
)


def export(
    run_dir: Path = typer.Argument(
        ...,
        metavar="RUN_DIR",
        help=(
            "The run to export: a run directory, its best/ or a checkpoint file inside either "
            "(LoRA runs are merged)."
        ),
    ),
    fmt: str = typer.Option(
        ...,
        "--format",
        "-f",
        metavar="hf|gguf",
        help="hf (a transformers directory) or gguf (one llama.cpp file).",
    ),
    output: Path = typer.Option(
        ...,
        "-o",
        "--output",
        metavar="OUT",
        help="The directory (hf) or .gguf file (gguf) to write.",
    ),
    out_type: str = typer.Option(
        "f16", "--type", help=f"GGUF weight type: {', '.join(GGUF_TYPES)} (norms stay f32)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Export a run to Hugging Face transformers or to GGUF for llama.cpp."""
    if fmt not in FORMATS:
        raise TformerError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    result = (
        export_hf(run_dir, output, overwrite)
        if fmt == "hf"
        else export_gguf(run_dir, output, out_type, overwrite)
    )
    merged = " (LoRA adapter merged into its base)" if result.merged_lora else ""
    kind = "" if fmt == "hf" else f" {out_type}"
    Console().print(
        f"exported {run_dir} as {result.architecture}{kind}: {result.params:,} parameters{merged}"
    )
    Console().print(
        f"wrote {result.path}" + (f": {', '.join(result.files)}" if fmt == "hf" else "")
    )
