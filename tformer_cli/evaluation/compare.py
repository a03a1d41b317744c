"""Every model on every text: the rows of `tformer eval`, ranked by bits per byte per text.

A model is loaded once per --quantize scheme (load_for_inference: a LoRA run merged into its
base, a Hugging Face directory read in place, weights cast to --precision) and scores each text
in windows of the sequence length it trained at (scoring.py says which tokens count).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tformer_cli.errors import TformerError
from tformer_cli.evaluation.scoring import (
    CannotEncode,
    Score,
    TextTooShort,
    default_batch_size,
    score_documents,
    warm_up,
)
from tformer_cli.evaluation.texts import NoHeldOutText, Text, held_out_text
from tformer_cli.inference.load import (
    check_quantize,
    inference_target,
    load_for_inference,
    model_precision,
)
from tformer_cli.runs.catalog import run_kind, seq_len_of
from tformer_cli.runs.rundir import Run

Event = Callable[[str, dict[str, Any]], None]


def no_events(kind: str, data: dict[str, Any]) -> None:
    """Report nothing."""


@dataclass
class EvalSettings:
    """How to score: the window (None: the sequence length each run trained at), the stride
    (None: half the window), windows per forward pass (None: by the vocabulary's size), where."""

    window: int | None = None
    stride: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    precision: str = "auto"

    def validate(self) -> None:
        """Raise a TformerError naming the first option out of range."""
        for flag, value in (
            ("--seq-len", self.window),
            ("--stride", self.stride),
            ("--batch-size", self.batch_size),
        ):
            if value is not None and value < 1:
                raise TformerError(f"{flag} must be at least 1, got {value}")


@dataclass
class Model:
    """A model to evaluate: how the user named it and the directory it loads from."""

    label: str
    path: Path


@dataclass
class Row:
    """One model on one text."""

    model: str
    path: str
    kind: str
    quantize: str
    precision: str
    device: str
    text: str
    text_key: tuple
    score: Score
    best: bool = False

    @property
    def name(self) -> str:
        """The model as the table names it: its label, and its quantization if any."""
        return self.model if self.quantize == "none" else f"{self.model} ({self.quantize})"

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON values."""
        names = ("model", "path", "kind", "quantize", "precision", "device", "text")
        return {**{k: getattr(self, k) for k in names}, **self.score.to_dict(), "best": self.best}


def texts_for(models: list[Model], data: list[Text] | None, on_event: Event) -> dict[str, list]:
    """The texts each model is scored on: --data, else its own held-out text (models without one
    are left out with a "skipped" event; none left is an error)."""
    if data:
        return {m.label: data for m in models}
    found, missing = {}, []
    for m in models:
        try:
            found[m.label] = [held_out_text(m.path)]
        except NoHeldOutText as e:
            missing.append(f"{e}; pass --data FILE")
    if not found:
        raise TformerError(f"no held-out text to evaluate on: {missing[0]}")
    for reason in missing:
        on_event("skipped", {"reason": reason})
    return found


def evaluate(
    models: list[Model],
    data: list[Text] | None,
    settings: EvalSettings,
    schemes: list[str],
    on_event: Event = no_events,
) -> list[Row]:
    """Score every model (under each quantize scheme) on its texts; rows ranked per text."""
    settings.validate()
    # each scheme's device and precision (int8 computes in fp32), all checked before any work
    targets = {s: inference_target(settings.device, settings.precision, s) for s in schemes}
    for scheme, (device, _) in targets.items():
        check_quantize(scheme, device)
    texts = texts_for(models, data, on_event)
    rows = []
    for model in (m for m in models if m.label in texts):
        for scheme, (device, picked) in targets.items():
            precision = model_precision(settings.precision, device, picked, model.path)
            run = load_for_inference(model.path, device, precision, quantize=scheme)
            shape = plan(run, model, settings)
            warm_up(run.model, shape[0], device)
            for text in texts[model.label]:
                on_event("text", {"model": model.label, "text": text.label, "bytes": text.size})
                score = _score(run, model, text, shape, device, on_event)
                kind = run_kind(run.info, model.path)
                where = (str(model.path), kind, scheme, precision, str(device))
                rows.append(Row(model.label, *where, text.label, text.key, score))
                on_event("scored", {"row": rows[-1]})
            del run
    return rank(rows)


def plan(run: Run, model: Model, settings: EvalSettings) -> tuple[int, int, int]:
    """(window, stride, batch size) for a model, checked against its context."""
    context = run.config.max_seq_len
    window = settings.window or seq_len_of(model.path, context)
    if window > context:
        raise TformerError(
            f"--seq-len {window} is longer than {model.label}'s context of {context} tokens"
        )
    stride = settings.stride or max(1, window // 2)
    if stride > window:
        raise TformerError(f"--stride {stride} must be at most the window, {window} tokens")
    return window, stride, settings.batch_size or default_batch_size(window, run.config.vocab_size)


def _score(
    run: Run,
    model: Model,
    text: Text,
    shape: tuple[int, int, int],
    device: torch.device,
    on_event: Event,
) -> Score:
    """score_documents with plan()'s (window, stride, batch size), its errors said in one line
    naming the model and the text."""
    window, stride, batch = shape
    try:
        return score_documents(
            run.model,
            run.tokenizer,
            text.documents(),
            window,
            stride,
            batch,
            device,
            progress=lambda done: on_event("progress", {"done": done}),
        )
    except TextTooShort as e:
        raise TformerError(
            f"{text.label}: {e.tokens} tokens with {model.label}'s tokenizer, but one window of "
            f"{window} tokens of context needs {e.needed}; give a longer text or a smaller "
            "--seq-len"
        ) from None
    except CannotEncode as e:
        raise TformerError(f"{model.label} on {text.label}: {e}; choose another text") from None


def rank(rows: list[Row]) -> list[Row]:
    """The rows grouped by text (in the order the texts came), each group sorted by bits per
    byte, its lowest marked best."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.text_key, []).append(row)
    ranked = []
    for group in groups.values():
        group.sort(key=lambda r: (math.isnan(r.score.bits_per_byte), r.score.bits_per_byte))
        group[0].best = True
        ranked += group
    return ranked
