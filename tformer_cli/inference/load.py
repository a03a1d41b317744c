"""A run loaded for inference: on the chosen device, at the chosen precision or quantized,
prepared for fast decoding."""

from __future__ import annotations

from pathlib import Path

import torch

from models.quantize import SCHEMES, int8_available
from tformer_cli.device import (
    auto_precision_for_model,
    inference_weights,
    load_dtype,
    ready_for_inference,
    resolve_device,
    resolve_precision,
)
from tformer_cli.errors import TformerError
from tformer_cli.runs.rundir import Run, load_run, read_model_config


def inference_target(
    device: str = "auto", precision: str = "auto", quantize: str = "none"
) -> tuple[torch.device, str]:
    """The device and precision that --device and --precision pick for inference.

    With --quantize int8 the float parts (embeddings, norms, activations) are fp32, which is what
    auto picks then; an explicit bf16 or fp16 is refused in one line.
    """
    dev = resolve_device(device)
    if quantize == "none" or quantize not in SCHEMES:
        return dev, resolve_precision(precision, dev, job="inference")
    if precision not in ("auto", "fp32"):
        resolve_precision(precision, dev, job="inference")  # a bad name is reported as such
        raise TformerError(
            f"--quantize {quantize} multiplies int8 weights by fp32 activations; "
            f"drop --precision {precision} (or use --precision fp32)"
        )
    return dev, "fp32"


def model_precision(flag: str, device: torch.device, precision: str, model_dir: Path) -> str:
    """precision, or for --precision auto the pick for this model's size (small models decode
    faster in fp32 than with packed bf16 weights: device.auto_precision_for_model)."""
    if flag != "auto" or precision == "fp32":
        return precision
    return auto_precision_for_model(device, read_model_config(model_dir).num_params())


def check_quantize(scheme: str, device: torch.device, compile: bool = False) -> str:
    """scheme, or one line saying what --quantize takes and where it runs."""
    if scheme not in SCHEMES:
        raise TformerError(f"--quantize {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if scheme == "none":
        return scheme
    if device.type != "cpu":
        raise TformerError(
            f"--quantize {scheme}: its kernels (fbgemm) run on the CPU only, not on "
            f"{device.type}; on {device.type} use --precision bf16 (or fp16), or add --device cpu"
        )
    if not int8_available():
        raise TformerError(
            f"--quantize {scheme}: this torch build has no fbgemm int8 kernels (x86 CPUs only); "
            "use --precision fp32 or bf16"
        )
    if compile:
        raise TformerError(
            f"--quantize {scheme} does not combine with --compile (torch.compile cannot trace "
            "the int8 kernels); drop one of them"
        )
    return scheme


def load_for_inference(
    model_dir: Path,
    device: torch.device,
    precision: str,
    compile: bool = False,
    quantize: str = "none",
) -> Run:
    """The run on device, prepared as device.ready_for_inference does (a LoRA run merged first).

    The weights are read from the run's safetensors and quantized or packed in memory, never
    written back. With quantize="int8" the float parts are fp32 whatever precision says.
    """
    check_quantize(quantize, device, compile)
    weights = inference_weights(device, precision, quantize, compile)
    run = load_run(model_dir, device=device, dtype=load_dtype(weights, precision))
    run.model = ready_for_inference(run.model, device, precision, quantize, compile)
    return run
