"""`tformer finetune BASE_RUN DATA -o RUN_DIR`: LoRA or full fine-tuning on instruction and chat
data."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from tformer_cli.commands import options
from tformer_cli.commands.progress import run_with_progress
from tformer_cli.inference.chat import render_prompt
from tformer_cli.inference.sampling import SamplingConfig
from tformer_cli.inference.text import generate
from tformer_cli.training.config import config_flags, load_train_config, parse_duration
from tformer_cli.training.finetune import FinetuneOptions
from tformer_cli.training.finetune import finetune as run_finetune

SAMPLE_PROMPT = "Give three tips for staying healthy."
EXAMPLES = (
    "tformer finetune runs/corpus chat.jsonl -o runs/chat",
    "tformer finetune runs/corpus/best alpaca.json -o runs/alpaca --lora-rank 16 --epochs 3",
    "tformer finetune runs/corpus chat.jsonl -o runs/chat-full --full --lr 1e-4 --time 10m",
)


def _chat_sampler(model, tok) -> str:
    """The model's reply to a fixed question, so you see fine-tuning take hold."""
    messages = [{"role": "user", "content": SAMPLE_PROMPT}]
    # a base without the markers (an imported model) learns text: continue a plain transcript
    ids = render_prompt(tok, "chat" if tok.has_chat_markers else "plain", messages)
    ids = ids[-model.config.max_seq_len + 60 :]
    (reply,), _ = generate(model, tok, [ids], SamplingConfig(temperature=0), 60)
    return f"{SAMPLE_PROMPT} -> {reply.text}"


def finetune(
    base: Path = typer.Argument(
        ...,
        metavar="BASE_RUN",
        help="The base model: a run directory, its best/, a model.safetensors inside either, "
        "or a Hugging Face Llama directory.",
    ),
    data: list[Path] = typer.Argument(
        ...,
        metavar="DATA",
        help="JSONL/JSON files (messages, instruction/input/output, prompt/completion, text) "
        "or .txt.",
    ),
    output: Path = typer.Option(
        ..., "-o", "--output", metavar="RUN_DIR", help="The run directory to write."
    ),
    lora: bool = typer.Option(
        True, "--lora/--full", help="Train a LoRA adapter (default) or all weights."
    ),
    lora_rank: int = typer.Option(8, "--lora-rank"),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha"),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout"),
    lora_targets: str = typer.Option(
        "q,k,v,o", "--lora-targets", help="Comma-separated: q, k, v, o, mlp."
    ),
    train_on_prompt: bool = typer.Option(
        False, "--train-on-prompt", help="Also learn the prompt tokens."
    ),
    epochs: float = typer.Option(
        1.0, "--epochs", help="Passes over the data (unless --max-steps)."
    ),
    max_steps: int = typer.Option(None, "--max-steps"),
    time_budget: str = typer.Option(None, "--time", help="Wall-clock budget, e.g. 5m."),
    val_split: float = typer.Option(
        0.05, "--val-split", help="Share of the examples held out for validation."
    ),
    val_data: list[Path] = typer.Option(
        None, "--val-data", help="Validation file(s) instead of a split."
    ),
    merge: bool = typer.Option(
        False, "--merge", help="Also write a standalone merged model.safetensors."
    ),
    batch_size: int = typer.Option(8, "--batch-size"),
    grad_accum: int = typer.Option(1, "--grad-accum"),
    seq_len: int = typer.Option(
        None, "--seq-len", help="Pad/truncate examples to this (default: the base's context)."
    ),
    lr: float = typer.Option(
        None, "--lr", help="Peak LR (default 5e-4 for LoRA, 1e-4 for --full)."
    ),
    warmup: int = typer.Option(None, "--warmup"),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    precision: str = typer.Option("auto", "--precision"),
    device: str = typer.Option("auto", "--device"),
    seed: int = typer.Option(1337, "--seed"),
    eval_every: int = typer.Option(50, "--eval-every"),
    eval_batches: int = typer.Option(5, "--eval-batches"),
    save_every: int = typer.Option(200, "--save-every"),
    log_every: int = typer.Option(10, "--log-every"),
    sample_every: int = typer.Option(
        None,
        "--sample-every",
        help="Show a reply to a fixed prompt every N steps (default: at evals; 0: never).",
    ),
    resume: bool = typer.Option(False, "--resume"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    as_json: bool = typer.Option(False, "--json", help="Print the run card as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    quantize: str = options.refuse_quantize(),
) -> None:
    """Fine-tune a base run on instruction or chat data (loss on the assistant's tokens)."""
    flags = config_flags(
        locals(),
        time=parse_duration(time_budget) if time_budget else None,
        lr=lr or (5e-4 if lora else 1e-4),
    )
    cfg = load_train_config(None, flags)
    opts = FinetuneOptions(
        lora=lora,
        rank=lora_rank,
        alpha=lora_alpha,
        dropout=lora_dropout,
        targets=[t.strip() for t in lora_targets.split(",") if t.strip()],
        train_on_prompt=train_on_prompt,
        val_split=val_split,
        val_data=list(val_data or []),
        epochs=epochs,
        merge=merge,
    )
    how = dict(resume=resume, overwrite=overwrite, sampler=_chat_sampler)
    run_with_progress(partial(run_finetune, cfg, opts, base, data, output, **how), quiet, as_json)
