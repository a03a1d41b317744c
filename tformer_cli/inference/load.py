"""A run loaded for inference: on the chosen device, cast to the chosen precision, prepared."""

from __future__ import annotations

from pathlib import Path

import torch

from tformer_cli.device import DTYPES, resolve_device, resolve_precision
from tformer_cli.runs.rundir import Run, load_run


def inference_target(device: str = "auto", precision: str = "auto") -> tuple[torch.device, str]:
    """The device and precision that --device and --precision pick for inference."""
    dev = resolve_device(device)
    return dev, resolve_precision(precision, dev, job="inference")


def load_for_inference(
    model_dir: Path, device: torch.device, precision: str, compile: bool = False
) -> Run:
    """The run on device, its weights cast (not autocast) to precision, its model prepared for
    fast decoding (and its prefill compiled with compile=True)."""
    run = load_run(model_dir, device=device, dtype=DTYPES[precision])
    run.model.prepare_for_inference(compile=compile)
    return run
