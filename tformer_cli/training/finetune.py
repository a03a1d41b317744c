"""Fine-tuning: a base run + instruction/chat data -> a LoRA adapter or new full weights.

Runs the same loop as pretraining (progress, metrics, checkpoints, Ctrl-C and --resume,
torchrun); only the data (padded examples with a loss mask), the model (base weights, LoRA
wrapped) and what is saved (adapter.safetensors + a pointer to the base) differ.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import Transformer
from models.lora import apply_lora, lora_state, merge_lora
from models.weights import (
    atomic_write_bytes,
    read_config_file,
    save_state,
    save_tensors,
    write_config,
)
from tformer_cli.data.examples import ExampleBatches, load_examples
from tformer_cli.data.tokenizer import load_tokenizer
from tformer_cli.device import resolve_device, resolve_precision
from tformer_cli.errors import TformerError
from tformer_cli.runs.locate import resolve_model_path
from tformer_cli.runs.rundir import ADAPTER_FILE, TOKENIZER_FILE, load_run_model
from tformer_cli.runs.target import (
    check_run_dir_use,
    claim_given,
    clear_run_dir,
    refuse_output_over_inputs,
)
from tformer_cli.training.config import TrainConfig
from tformer_cli.training.distributed import init_distributed, shutdown_distributed
from tformer_cli.training.pretrain import (
    Event,
    LoopSpec,
    Sampler,
    _noop,
    check_batch_fits,
    run_loop,
)


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
                f"--val-split must be between 0 and 1 (the share of examples held out), got {self.val_split}"
            )
        if self.lora and not self.targets:
            raise TformerError("--lora-targets: name at least one of q, k, v, o, mlp")


def _base_fingerprint(base: Path) -> str:
    """Identifies the base weights, so a resume cannot silently switch bases."""
    h = hashlib.sha256()
    for name in ("model.safetensors", ADAPTER_FILE, "config.json"):
        if (base / name).is_file():
            h.update((base / name).read_bytes())
    return h.hexdigest()


def finetune(
    cfg: TrainConfig,
    opts: FinetuneOptions,
    base_dir: str | Path,
    data_paths: list[str | Path],
    run_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    on_event: Event = _noop,
    stop: threading.Event | None = None,
    sampler: Sampler | None = None,
) -> dict[str, Any]:
    """Fine-tune the base run on the data into run_dir; returns the run card."""
    started = time.perf_counter()
    cfg.validate()
    opts.validate()
    run_dir = Path(run_dir)
    base = resolve_model_path(base_dir).resolve()
    refuse_output_over_inputs(run_dir, [Path(p) for p in [*data_paths, *opts.val_data]], [base])
    fingerprint = _base_fingerprint(base)
    base_model, _ = load_run_model(base)
    model_cfg = base_model.config
    tok = load_tokenizer(base / TOKENIZER_FILE)
    if resume:
        info = read_config_file(run_dir)
        if info.get("base_fingerprint") != fingerprint:
            raise TformerError(
                f"{run_dir}: was fine-tuned from another base than {base}; resume with its own base"
            )
    examples = load_examples([Path(p) for p in data_paths], tok, opts.train_on_prompt)
    if opts.val_data:
        train_ex, val_ex = examples, load_examples(opts.val_data, tok, opts.train_on_prompt)
    else:
        n_val = max(1, int(len(examples) * opts.val_split)) if len(examples) > 1 else 0
        train_ex, val_ex = (
            examples[: len(examples) - n_val],
            examples[len(examples) - n_val :] or examples[-1:],
        )
    seq_len = cfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise TformerError(
            f"--seq-len {seq_len} is longer than the base model's context of {model_cfg.max_seq_len}"
        )
    if cfg.max_steps is None and cfg.time is None:
        cfg.max_steps = max(1, math.ceil(opts.epochs * len(train_ex) / cfg.batch_size))
    pad = (
        tok.pad_id if tok.pad_id >= 0 else tok.eos_id
    )  # Llama tokenizers have no pad; padding is masked anyway
    train_batches = ExampleBatches(train_ex, seq_len, pad, cfg.seed)
    val_batches = ExampleBatches(val_ex, seq_len, pad, cfg.seed + 1, shuffle=False)

    if opts.lora:
        try:
            with torch.device("meta"):  # fail fast on targets, without allocating a model
                apply_lora(Transformer(model_cfg), opts.targets, opts.rank, opts.alpha)
        except ValueError as e:
            raise TformerError(f"--lora-targets: {e}") from None
    base_state = base_model.state_dict()

    def build_model() -> torch.nn.Module:
        model = Transformer(model_cfg)
        model.load_state_dict(base_state)
        if opts.lora:
            apply_lora(model, opts.targets, opts.rank, opts.alpha, opts.dropout)
        return model

    lora_info = (
        {"rank": opts.rank, "alpha": opts.alpha, "targets": opts.targets} if opts.lora else None
    )
    info = {
        "chat": True,
        "base": str(base),
        "base_fingerprint": fingerprint,
        "tokenizer_sha256": tok.sha256,
        "finetune": "lora" if opts.lora else "full",
    }
    if lora_info:
        info["lora"] = lora_info

    def save_weights(
        weights: dict[str, torch.Tensor], directory: Path, extra: dict[str, Any]
    ) -> None:
        if opts.lora:
            save_tensors(lora_state(weights), directory / ADAPTER_FILE)
            write_config(directory, model_cfg, extra)
        else:
            save_state(weights, model_cfg, directory, extra)

    spec = LoopSpec(
        model_cfg=model_cfg,
        build_model=build_model,
        train_batches=train_batches,
        val_batches=val_batches,
        seq_len=seq_len,
        save_weights=save_weights,
        info=info,
        started=started,
        label=f"{base.name} + "
        + (f"LoRA r{opts.rank} ({','.join(opts.targets)})" if opts.lora else "full fine-tune"),
    )

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    dist, device = init_distributed(device)
    if not dist.is_main:
        on_event = _noop
    target, failed = None, True
    try:
        if dist.is_main:
            target = claim_given(run_dir, resume, overwrite)
            check_run_dir_use(run_dir, resume, overwrite)
        check_batch_fits(cfg, model_cfg, seq_len, precision, device, dist)
        on_event(
            "data",
            {
                "train_examples": len(train_ex),
                "val_examples": len(val_ex),
                "truncated": train_batches.truncated,
            },
        )
        if dist.is_main:  # every input is known good: only now may an --overwrite remove a run
            clear_run_dir(run_dir, resume)
            if not resume:
                atomic_write_bytes(run_dir / TOKENIZER_FILE, (base / TOKENIZER_FILE).read_bytes())
        dist.barrier()
        card = run_loop(
            cfg,
            spec,
            tok,
            run_dir,
            device,
            precision,
            dist,
            resume,
            on_event,
            stop or threading.Event(),
            sampler,
        )
        failed = False
    finally:
        if target is not None:
            target.release(failed)
        shutdown_distributed(dist)
    card.update(
        finetune=info["finetune"],
        train_examples=len(train_ex),
        truncated_examples=train_batches.truncated,
    )
    if opts.lora and dist.is_main:
        card["adapter_bytes"] = (run_dir / ADAPTER_FILE).stat().st_size
    if opts.merge and opts.lora and dist.is_main and not card["interrupted"]:
        merge_run(run_dir)
        card["merged"] = True
    return card


def merge_run(run_dir: str | Path) -> None:
    """Write the LoRA run's base + adapter as a standalone model.safetensors (config says "merged")."""
    run_dir = Path(run_dir)
    model, info = load_run_model(run_dir)
    save_state(
        merge_lora(model).state_dict(),
        model.config,
        run_dir,
        {**{k: v for k, v in info.items() if k not in ("format", "model")}, "merged": True},
    )
