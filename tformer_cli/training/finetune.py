"""Fine-tuning: a base run + instruction/chat data -> a LoRA adapter or new full weights.

Runs the same loop as pretraining (progress, metrics, checkpoints, Ctrl-C and --resume,
torchrun); only the data (padded examples with a loss mask), the model (base weights, LoRA
wrapped) and what is saved (adapter.safetensors + a pointer to the base) differ.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import ModelConfig, Transformer
from models.lora import apply_lora, lora_state, merge_lora
from models.weights import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_config_file,
    save_state,
    save_tensors,
    write_config,
)
from tformer_cli.data.examples import Example, ExampleBatches, load_examples
from tformer_cli.data.tokenizer import Tokenizer, load_tokenizer
from tformer_cli.errors import TformerError
from tformer_cli.runs.locate import resolve_model_path
from tformer_cli.runs.rundir import ADAPTER_FILE, TOKENIZER_FILE, load_run_model
from tformer_cli.runs.target import claim_given, refuse_output_over_inputs
from tformer_cli.training.budget import TimeBudget
from tformer_cli.training.config import TrainConfig
from tformer_cli.training.context import Event, LoopSpec, Sampler, no_events, open_run
from tformer_cli.training.loop import run_loop
from tformer_cli.training.trainable import check_batch_fits


@dataclass
class FinetuneOptions:
    """What fine-tuning adds to the training settings."""

    lora: bool = True
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])
    train_on_prompt: bool = False
    val_split: float = 0.05
    val_data: list[Path] = field(default_factory=list)
    epochs: float = 1.0
    merge: bool = False

    def validate(self) -> None:
        """Raise a TformerError naming the first option out of range."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise TformerError(f"--lora-rank must be a whole number of at least 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise TformerError(f"--lora-alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:  # NaN fails this too
            raise TformerError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise TformerError(
                f"--epochs must be a positive number of passes over the data, got {self.epochs}"
            )
        if not 0 < self.val_split < 1:
            raise TformerError(
                "--val-split must be between 0 and 1 (the share of examples held out), "
                f"got {self.val_split}"
            )
        if self.lora and not self.targets:
            raise TformerError("--lora-targets: name at least one of q, k, v, o, mlp")


def _base_fingerprint(base: Path) -> str:
    """Identifies the base weights, so a resume cannot silently switch bases."""
    h = hashlib.sha256()
    for name in (WEIGHTS_FILE, ADAPTER_FILE, CONFIG_FILE):
        if (base / name).is_file():
            h.update((base / name).read_bytes())
    return h.hexdigest()


@dataclass
class Base:
    """The run that fine-tuning starts from."""

    path: Path
    model: Transformer
    tokenizer: Tokenizer
    fingerprint: str


def finetune(
    cfg: TrainConfig,
    opts: FinetuneOptions,
    base_dir: str | Path,
    data_paths: list[str | Path],
    run_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    on_event: Event = no_events,
    stop: threading.Event | None = None,
    sampler: Sampler | None = None,
) -> dict[str, Any]:
    """Fine-tune the base run on the data into run_dir; returns the run card."""
    budget = TimeBudget(cfg.time)  # --time counts from here
    cfg.validate()
    opts.validate()
    run_dir = Path(run_dir)
    base_path = resolve_model_path(base_dir).resolve()
    inputs = [Path(p) for p in [*data_paths, *opts.val_data]]
    refuse_output_over_inputs(run_dir, inputs, [base_path])
    base = load_base(base_path, run_dir, resume)
    train_ex, val_ex = split_examples([Path(p) for p in data_paths], opts, base.tokenizer)
    spec = finetuning_spec(cfg, opts, base, train_ex, val_ex)
    truncated = spec.train_batches.truncated
    with open_run(cfg, budget, resume, overwrite, on_event, stop, sampler) as ctx:
        ctx.run_dir = run_dir
        if ctx.dist.is_main:
            ctx.claim(claim_given(run_dir, resume, overwrite))
        check_batch_fits(cfg, spec.model_cfg, spec.seq_len, ctx.precision, ctx.device, ctx.dist)
        counts = {"train_examples": len(train_ex), "val_examples": len(val_ex)}
        ctx.on_event("data", {**counts, "truncated": truncated})
        ctx.prepare_run_dir(base.path / TOKENIZER_FILE)
        card = run_loop(ctx, spec)
    card.update(
        finetune=spec.info["finetune"], train_examples=len(train_ex), truncated_examples=truncated
    )
    if opts.lora and ctx.dist.is_main:
        card["adapter_bytes"] = (run_dir / ADAPTER_FILE).stat().st_size
    if opts.merge and opts.lora and ctx.dist.is_main and not card["interrupted"]:
        merge_run(run_dir)
        card["merged"] = True
    return card


def load_base(path: Path, run_dir: Path, resume: bool) -> Base:
    """The base run's model and tokenizer; on --resume, the base the run was started from."""
    fingerprint = _base_fingerprint(path)
    model, _ = load_run_model(path)
    tok = load_tokenizer(path / TOKENIZER_FILE)
    if resume:
        info = read_config_file(run_dir)
        if info.get("base_fingerprint") != fingerprint:
            raise TformerError(
                f"{run_dir}: was fine-tuned from another base than {path}; resume with its own base"
            )
    return Base(path, model, tok, fingerprint)


def split_examples(
    paths: list[Path], opts: FinetuneOptions, tok: Tokenizer
) -> tuple[list[Example], list[Example]]:
    """(training, validation) examples: --val-data, else the last --val-split of the data."""
    examples = load_examples(paths, tok, opts.train_on_prompt)
    if opts.val_data:
        return examples, load_examples(opts.val_data, tok, opts.train_on_prompt)
    n_val = max(1, int(len(examples) * opts.val_split)) if len(examples) > 1 else 0
    cut = len(examples) - n_val
    return examples[:cut], examples[cut:] or examples[-1:]


def finetuning_spec(
    cfg: TrainConfig,
    opts: FinetuneOptions,
    base: Base,
    train_ex: list[Example],
    val_ex: list[Example],
) -> LoopSpec:
    """Padded examples with a loss mask, the base model (LoRA-wrapped), the adapter or the full
    weights saved. Without --max-steps or --time, the steps are --epochs passes over the data."""
    model_cfg, tok = base.model.config, base.tokenizer
    seq_len = cfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise TformerError(
            f"--seq-len {seq_len} is longer than the base model's context of "
            f"{model_cfg.max_seq_len}"
        )
    if cfg.max_steps is None and cfg.time is None:
        cfg.max_steps = max(1, math.ceil(opts.epochs * len(train_ex) / cfg.batch_size))
    pad = tok.pad_id if tok.pad_id >= 0 else tok.eos_id  # Llama tokenizers have none; masked
    train_batches = ExampleBatches(train_ex, seq_len, pad, cfg.seed)
    val_batches = ExampleBatches(val_ex, seq_len, pad, cfg.seed + 1, shuffle=False)
    if opts.lora:
        _check_lora_targets(opts, model_cfg)
    base_state = base.model.state_dict()

    def build_model() -> torch.nn.Module:
        model = Transformer(model_cfg)
        model.load_state_dict(base_state)
        if opts.lora:
            apply_lora(model, opts.targets, opts.rank, opts.alpha, opts.dropout)
        return model

    def save_weights(weights: dict[str, torch.Tensor], directory: Path, extra: dict) -> None:
        if opts.lora:
            save_tensors(lora_state(weights), directory / ADAPTER_FILE)
            write_config(directory, model_cfg, extra)
        else:
            save_state(weights, model_cfg, directory, extra)

    how = f"LoRA r{opts.rank} ({','.join(opts.targets)})" if opts.lora else "full fine-tune"
    return LoopSpec(
        model_cfg=model_cfg,
        build_model=build_model,
        train_batches=train_batches,
        val_batches=val_batches,
        seq_len=seq_len,
        save_weights=save_weights,
        info=_run_info(opts, base),
        tokenizer=tok,
        label=f"{base.path.name} + {how}",
    )


def _check_lora_targets(opts: FinetuneOptions, model_cfg: ModelConfig) -> None:
    """Fail fast on bad --lora-targets, without allocating a model."""
    try:
        with torch.device("meta"):
            apply_lora(Transformer(model_cfg), opts.targets, opts.rank, opts.alpha)
    except ValueError as e:
        raise TformerError(f"--lora-targets: {e}") from None


def _run_info(opts: FinetuneOptions, base: Base) -> dict[str, Any]:
    """What config.json records of a fine-tune: its base (by path and content) and how."""
    info = {
        "chat": True,
        "base": str(base.path),
        "base_fingerprint": base.fingerprint,
        "tokenizer_sha256": base.tokenizer.sha256,
        "finetune": "lora" if opts.lora else "full",
    }
    if opts.lora:
        info["lora"] = {"rank": opts.rank, "alpha": opts.alpha, "targets": opts.targets}
    return info


def merge_run(run_dir: str | Path) -> None:
    """Write the LoRA run's base + adapter as a standalone model.safetensors.

    Its config.json says "merged".
    """
    run_dir = Path(run_dir)
    model, info = load_run_model(run_dir)
    save_state(
        merge_lora(model).state_dict(),
        model.config,
        run_dir,
        {**{k: v for k, v in info.items() if k not in ("format", "model")}, "merged": True},
    )
