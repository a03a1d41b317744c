"""The pretraining recipe: corpus -> tokenizer -> token file -> model -> checkpoints and a run card.

Everything is checked before anything is replaced: the corpus (read as the tokenizer and the
pre-tokeniser will read it), the tokenizer, the model and its memory. Only then does an
--overwrite remove the run that was there. The training itself is the shared loop (loop.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path
from typing import Any

from models import ModelConfig, Transformer
from models.weights import atomic_write, load_config, save_state
from tformer_cli.data.batches import BatchSampler
from tformer_cli.data.corpus import check_corpus_text, resolve_corpus
from tformer_cli.data.pretokenize import TokenData, pretokenize_cached
from tformer_cli.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from tformer_cli.device import matmul_peak_flops
from tformer_cli.errors import TformerError
from tformer_cli.runs.locate import DEFAULT_RUNS_DIR
from tformer_cli.runs.rundir import STAGED_TOKENIZER, TOKENIZER_FILE
from tformer_cli.runs.target import claim_run_dir, refuse_output_over_inputs
from tformer_cli.training import auto
from tformer_cli.training.auto import AUTO, AutoChoice, recorded_choice
from tformer_cli.training.budget import TimeBudget
from tformer_cli.training.config import TrainConfig, default_vocab_size
from tformer_cli.training.context import (
    Event,
    LoopSpec,
    RunContext,
    Sampler,
    no_events,
    open_run,
)
from tformer_cli.training.distributed import DistInfo
from tformer_cli.training.loop import run_loop
from tformer_cli.training.trainable import check_batch_fits


def train(
    cfg: TrainConfig,
    corpus_paths: list[str | Path],
    run_dir: str | Path | None,
    cache_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    on_event: Event = no_events,
    stop: threading.Event | None = None,
    sampler: Sampler | None = None,
    runs_root: str | Path = DEFAULT_RUNS_DIR,
) -> dict[str, Any]:
    """Train a model on the corpus into run_dir; returns the run card (also saved as run_card.json).

    run_dir None names the run after the corpus under runs_root (runs/corpus, or the next free
    name); the run directory stays locked while this writes to it.
    """
    budget = TimeBudget(cfg.time)  # --time counts from here
    cfg.validate()
    with open_run(cfg, budget, resume, overwrite, on_event, stop, sampler) as ctx:
        try:
            exclude = [Path(run_dir)] if run_dir is not None else []
            corpus = resolve_corpus([Path(p) for p in corpus_paths], exclude=exclude)
            choose_run_dir(ctx, corpus, corpus_paths, run_dir, runs_root)
            tok = prepare_tokenizer(cfg, corpus, ctx.run_dir, resume, ctx.dist, ctx.on_event)
            data = prepare_data(corpus, tok, Path(cache_dir), cfg, ctx.dist, ctx.on_event)
            if cfg.preset == AUTO:
                cfg = ctx.cfg = resolve_auto(ctx, tok.vocab_size, data.train_tokens)
                ctx.on_event("auto", cfg.auto)
            model_cfg = cfg.model_config(tok.vocab_size)
            if resume:
                check_model_matches(ctx.run_dir, model_cfg)
            spec = pretraining_spec(cfg, model_cfg, tok, data, corpus)
            ctx.prepare_run_dir(ctx.run_dir / STAGED_TOKENIZER)
            return run_loop(ctx, spec)
        finally:
            if ctx.target is not None:
                (ctx.target.path / STAGED_TOKENIZER).unlink(missing_ok=True)


def resolve_auto(ctx: RunContext, vocab_size: int, train_tokens: int | None = None) -> TrainConfig:
    """ctx.cfg with --preset auto replaced by the shape, learning rate and batch its --time buys
    here (training/auto.py; a flag the user gave wins), or by those a resumed run recorded.

    Rank 0 decides and the other ranks take its choice, so every process builds the same model.
    """
    cfg = ctx.cfg
    choice = recorded_choice(ctx.run_dir) if ctx.resume and ctx.dist.is_main else None
    if choice is None and ctx.dist.is_main:
        peak = matmul_peak_flops(ctx.device, ctx.precision)
        choice = auto.choose(cfg.time, peak, vocab_size, train_tokens)
    text = json.dumps(choice.to_dict()) if choice is not None else None
    choice = AutoChoice(**json.loads(ctx.dist.broadcast_text(text, ctx.device)))
    defaults = TrainConfig()
    resolved = dataclasses.replace(
        cfg,
        preset=auto.BASE_PRESET,
        model={**choice.model, **cfg.model},
        lr=choice.lr if cfg.lr == defaults.lr else cfg.lr,
        batch_size=choice.batch_size if cfg.batch_size == defaults.batch_size else cfg.batch_size,
        dropout=choice.dropout if cfg.dropout is None else cfg.dropout,
        auto=choice.to_dict(),
    )
    resolved.validate()
    return resolved


def choose_run_dir(
    ctx: RunContext,
    corpus: list[Path],
    corpus_paths: list[str | Path],
    run_dir: str | Path | None,
    runs_root: str | Path,
) -> None:
    """Check the inputs, then claim the run directory (rank 0 chooses; every rank learns it).

    The corpus text, the given tokenizer and whether the batch fits are checked before the
    directory is claimed, so bad input never creates, replaces or deletes anything.
    """
    cfg, dist, chosen = ctx.cfg, ctx.dist, None
    if dist.is_main:
        check_corpus_text(corpus)
        given = load_tokenizer(cfg.tokenizer) if cfg.tokenizer and not ctx.resume else None
        vocab = given.vocab_size if given else cfg.vocab_size or default_vocab_size(_bytes(corpus))
        expected = cfg.model_config(vocab)  # the model this run will build (its vocab, exactly)
        check_batch_fits(cfg, expected, cfg.context(expected), ctx.precision, ctx.device, dist)
        ctx.claim(claim_run_dir(run_dir, corpus_paths, ctx.resume, ctx.overwrite, runs_root))
        target = ctx.target
        if not ctx.resume:
            inputs = [*corpus, *([cfg.tokenizer] if cfg.tokenizer else [])]
            refuse_output_over_inputs(target.path, inputs)
        chosen = str(target.path)
        event = {
            "path": chosen,
            "how": target.how,
            "auto": target.auto,
            "previous": str(target.previous) if target.previous else None,
            "corpus": _corpus_label(corpus_paths[0]),
        }
        ctx.on_event("run_dir", event)
    ctx.run_dir = Path(dist.broadcast_text(chosen, ctx.device))
    dist.barrier()


def prepare_tokenizer(
    cfg: TrainConfig,
    corpus: list[Path],
    run_dir: Path,
    resume: bool,
    dist: DistInfo,
    on_event: Event,
) -> Tokenizer:
    """The run's tokenizer: the resumed run's, the one given, or one trained on the corpus.

    A new tokenizer is staged under a temporary name in run_dir and installed by
    the start only once the run's inputs are known good, so a failed start never
    replaces the tokenizer of the run it would have overwritten.
    """
    if resume:
        return load_tokenizer(run_dir / TOKENIZER_FILE)
    staged = run_dir / STAGED_TOKENIZER
    if dist.is_main:
        if cfg.tokenizer:
            source = load_tokenizer(cfg.tokenizer)  # validates before copying
            atomic_write(staged, lambda tmp: shutil.copyfile(source.path, tmp))
        else:
            vocab = cfg.vocab_size or default_vocab_size(_bytes(corpus))
            on_event("tokenizer_start", {"vocab_size": vocab})
            summary = train_tokenizer(corpus, staged, vocab_size=vocab)
            done = {"vocab_size": summary.vocab_size, "seconds": summary.seconds}
            on_event("tokenizer_done", done)
    dist.barrier()
    return load_tokenizer(staged)


def prepare_data(
    corpus: list[Path],
    tok: Tokenizer,
    cache_dir: Path,
    cfg: TrainConfig,
    dist: DistInfo,
    on_event: Event,
) -> TokenData:
    """The pre-tokenised corpus, from the cache when this corpus and tokenizer were seen before."""
    data = None
    if dist.is_main:
        data, hit = pretokenize_cached(
            corpus,
            tok,
            cache_dir,
            cfg.val_fraction,
            progress=lambda done, total: on_event(
                "tokenize_progress", {"done": done, "total": total}
            ),
            notice=lambda message: on_event("notice", {"message": message}),
        )
        counts = {"train_tokens": data.train_tokens, "val_tokens": data.val_tokens}
        on_event("data", {**counts, "cached": hit})
    dist.barrier()
    if data is None:
        data, _ = pretokenize_cached(corpus, tok, cache_dir, cfg.val_fraction)
    return data


def check_model_matches(run_dir: Path, model_cfg: ModelConfig) -> None:
    """On --resume, the flags must describe the model already in the run dir."""
    stored = load_config(run_dir)
    if stored != model_cfg:
        diffs = [
            f"{k} {getattr(stored, k)} vs {getattr(model_cfg, k)}"
            for k in model_cfg.to_dict()
            if getattr(stored, k) != getattr(model_cfg, k)
        ]
        raise TformerError(
            f"{run_dir}: holds a different model than the flags ask for ({', '.join(diffs)}); "
            "resume with the original flags or train into a new -o"
        )


def pretraining_spec(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    tok: Tokenizer,
    data: TokenData,
    corpus: list[Path] | None = None,
) -> LoopSpec:
    """Random windows of the token file, a fresh model, full weights saved; config.json records
    the corpus files (corpus_info) when they are given."""
    seq_len = cfg.context(model_cfg)
    train_tokens, val_tokens = data.load("train"), data.load("val")
    for split, tokens in (("training", train_tokens), ("validation", val_tokens)):
        if len(tokens) < seq_len + 1:
            raise TformerError(
                f"corpus too small: its {split} split has {len(tokens)} tokens "
                f"({data.train_tokens + data.val_tokens} in all) but --seq-len {seq_len} needs "
                f"{seq_len + 1}; use a smaller --seq-len or a larger corpus"
            )
    return LoopSpec(
        model_cfg=model_cfg,
        build_model=lambda: Transformer(model_cfg),
        train_batches=BatchSampler(train_tokens, seq_len, cfg.seed),
        val_batches=BatchSampler(val_tokens, seq_len, cfg.seed + 1),
        seq_len=seq_len,
        save_weights=lambda weights, directory, extra: save_state(
            weights, model_cfg, directory, extra
        ),
        info={
            "tokenizer_sha256": tok.sha256,
            **({"data": corpus_info(corpus, data, cfg.val_fraction)} if corpus else {}),
        },
        tokenizer=tok,
        bytes_per_token=data.val_bytes / max(1, data.val_tokens),
    )


def corpus_info(corpus: list[Path], data: TokenData, val_fraction: float) -> dict[str, Any]:
    """What config.json records of the corpus ("data"): each file's absolute path and size, their
    hash and the validation fraction, so `tformer eval` can find and check the held-out text."""
    return {
        "files": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in corpus],
        "corpus_sha256": data.corpus_sha256,
        "val_fraction": val_fraction,
        "val_bytes": data.val_bytes,
        "val_tokens": data.val_tokens,
    }


def _bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


def _corpus_label(path: str | Path) -> str:
    """How the run names its corpus: a file as given, a directory by its name (`.` says nothing)."""
    path = Path(path)
    return f"{path.resolve().name}/" if path.is_dir() else str(path)
