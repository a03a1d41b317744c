"""`tformer profile`: where memory and time go for a model on this device, analytic and measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from tformer_cli.errors import TformerError
from tformer_cli.inference.load import check_quantize, inference_target
from tformer_cli.profiling.render import render
from tformer_cli.profiling.report import profile as run_profile
from tformer_cli.profiling.source import ModelSource, resolve_source

EXAMPLES = (
    "tformer profile --seq-len 2048",
    "tformer profile -m runs/corpus --seq-len 256,512,1024 --quick",
    "tformer profile --preset small --batch-size 8 --json profile.json",
    "tformer profile -m runs/corpus --quantize int8 --quick",
)


def parse_seq_lens(text: str) -> list[int]:
    """'2048' or '256,512,1024' as positive integers."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TformerError(
            f"--seq-len {text!r}: use a whole number or a comma-separated list such as 256,512,1024"
        ) from None
    if not values or any(v < 1 for v in values):
        raise TformerError(f"--seq-len {text!r}: context lengths must be positive whole numbers")
    return values


def default_preset_line(source: ModelSource) -> str:
    """What profile says first when no model was named: whose figures these are."""
    return (
        f"profiling the default preset of `tformer train`: {source.label} "
        f"({source.config.num_params():,} parameters); choose another with -m, --preset or --config"
    )


def profile(
    model_dir: Path = typer.Option(
        None,
        "-m",
        "--model",
        metavar="RUN_DIR",
        help=(
            "A run directory, its best/, a model.safetensors inside either, or a Hugging Face "
            "Llama directory."
        ),
    ),
    preset: str = typer.Option(
        None,
        "--preset",
        metavar="NAME",
        help=(
            "A named model shape: nano, micro, tiny, small, small-gqa, gpt2 "
            "(default: micro, as `tformer train`)."
        ),
    ),
    config_file: Path = typer.Option(
        None,
        "--config",
        metavar="FILE",
        help=(
            "A TOML (or .json) file with a \\[model] table of model fields; "
            "`preset = NAME` starts from a preset."
        ),
    ),
    seq_len: str = typer.Option(
        None,
        "--seq-len",
        "-T",
        metavar="T",
        help=(
            "Context length, or a comma-separated list for a scaling table "
            "(default: the model's max_seq_len)."
        ),
    ),
    batch_size: int = typer.Option(1, "--batch-size", "-B", help="Sequences per batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    precision: str = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16."),
    quantize: str = typer.Option(
        "none",
        "--quantize",
        metavar="none|int8",
        help=(
            "Measure inference with int8 weights, next to fp32: bytes read per token, speed, "
            "and quality (loss change on the run's held-out text, KL divergence)."
        ),
    ),
    json_path: str = typer.Option(
        None,
        "--json",
        metavar="FILE",
        help="Write every figure as JSON to this file ('-': stdout, instead of the tables).",
    ),
    quick: bool = typer.Option(
        False, "--quick", help="Fewer repetitions: about 20 s for a small model on a laptop CPU."
    ),
    measure: bool = typer.Option(
        True,
        "--measure/--no-measure",
        help="Run the measurements (--no-measure: analytic figures only, instant).",
    ),
) -> None:
    """Where memory and time go: parameters, FLOPs, memory, measured speed, what fits, and how it scales with T."""  # noqa: E501 - --help shows the docstring line as written
    source = resolve_source(model_dir, preset, config_file)
    if batch_size < 1:
        raise TformerError(f"--batch-size must be at least 1, got {batch_size}")
    seq_lens = parse_seq_lens(seq_len) if seq_len else [source.config.max_seq_len]
    dev, prec = inference_target(device, precision, quantize)
    check_quantize(quantize, dev)
    err = Console(stderr=True)
    if source.default:
        err.print(default_preset_line(source), markup=False, highlight=False, soft_wrap=True)
    with err.status("profiling", spinner="dots") as status:
        report = run_profile(
            source,
            seq_lens,
            batch_size,
            dev,
            prec,
            quick=quick,
            run_measurements=measure,
            on_progress=lambda what: status.update(f"measuring: {what}"),
            quantize=quantize,
        )
    text = json.dumps(report, indent=2) + "\n"
    if json_path == "-":
        sys.stdout.write(text)
        return
    Console().print(render(report))
    if json_path:
        path = Path(json_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise TformerError(f"--json {path}: cannot write ({e.strerror})") from None
        err.print(f"[dim]wrote {path}[/]")
