"""Options that several commands take, declared once, and the checks of their values.

Not a command: each function returns a new typer.Option for one parameter of a command's
signature, with the flag names and help every command shares (a command picks its own default
where commands differ, e.g. chat samples cooler than generate):

    def generate(device: str = options.device(), temperature: float = options.temperature(0.8))
"""

from __future__ import annotations

from typing import Any

import typer

from tformer_cli.errors import TformerError

MODEL_HELP = (
    "A run directory, its best/, a model.safetensors inside either, or a Hugging Face Llama "
    "directory (default: the newest run under ./runs)."
)
MAX_NEW_TOKENS = 1_000_000  # -n beyond this is a typo, not a request (the window slides anyway)
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes


# -- which model, where ------------------------------------------------------------------------


def model() -> Any:
    """-m/--model RUN_DIR: which model (see MODEL_HELP)."""
    return typer.Option(None, "-m", "--model", metavar="RUN_DIR", help=MODEL_HELP)


def device() -> Any:
    """--device: auto, cpu, cuda or mps."""
    return typer.Option("auto", "--device", help="auto, cpu, cuda or mps.")


def precision() -> Any:
    """--precision: auto, fp32, bf16 or fp16."""
    return typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16.")


def quantize() -> Any:
    """--quantize: weights quantized at load time (none or int8)."""
    return typer.Option(
        "none",
        "--quantize",
        metavar="none|int8",
        help=(
            "none, or int8: the linear layers and the head as int8 weights, quantized as the "
            "model loads (CPU; about 2-4x faster decoding)."
        ),
    )


def refuse_quantize() -> Any:
    """A hidden --quantize for training commands: one line saying where quantization belongs
    (rather than an unknown-option usage box)."""
    return typer.Option(None, "--quantize", hidden=True, callback=_refuse_quantize)


def _refuse_quantize(value: str | None) -> None:
    if value is not None:
        raise TformerError(
            f"--quantize {value} is for inference, not training: train in full precision, then "
            "quantize when you load: tformer generate --quantize int8"
        )


def compile_prefill() -> Any:
    """--compile: torch.compile the model's prefill."""
    return typer.Option(
        False, "--compile", help="torch.compile the prefill (slow to start; for GPUs)."
    )


# -- sampling ----------------------------------------------------------------------------------


def max_new_tokens(default: int, text: str) -> Any:
    """-n/--max-new-tokens, with the command's default and help text."""
    return typer.Option(default, "-n", "--max-new-tokens", help=text)


def temperature(default: float) -> Any:
    """--temperature (0 is greedy)."""
    return typer.Option(default, "--temperature", help="0 is greedy.")


def top_k() -> Any:
    """--top-k (0: off)."""
    return typer.Option(0, "--top-k", help="Keep the k most likely tokens (0: off).")


def top_p(default: float) -> Any:
    """--top-p (1: off)."""
    return typer.Option(
        default, "--top-p", help="Keep the smallest set with this much probability (1: off)."
    )


def min_p() -> Any:
    """--min-p (0: off)."""
    return typer.Option(
        0.0, "--min-p", help="Drop tokens below min-p x the top probability (0: off)."
    )


def repetition_penalty(default: float, text: str) -> Any:
    """--repetition-penalty (1: off), with the command's default and help text."""
    return typer.Option(default, "--repetition-penalty", help=text)


def seed(text: str) -> Any:
    """--seed, with the command's help text."""
    return typer.Option(None, "--seed", help=text)


# -- checks --------------------------------------------------------------------------------------


def check_seed(value: int | None, flag: str = "--seed", most: int = MAX_SEED) -> int | None:
    """value, or a TformerError when it is outside what a torch.Generator takes (0..most)."""
    if value is not None and not 0 <= value <= most:
        raise TformerError(f"{flag} must be between 0 and {most:,}, got {value}")
    return value


def check_max_new_tokens(n: int, flag: str = "-n/--max-new-tokens") -> int:
    """n, or a TformerError when it is below 1 or above MAX_NEW_TOKENS."""
    if not 1 <= n <= MAX_NEW_TOKENS:
        raise TformerError(f"{flag} must be between 1 and {MAX_NEW_TOKENS:,}, got {n}")
    return n
