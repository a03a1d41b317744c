"""The pretraining loop: corpus -> tokenizer -> token file -> model -> checkpoints and a run card.

The loop reports through `on_event(kind, data)` and never prints. It stops cleanly when `stop`
is set (Ctrl-C), saving a checkpoint that `resume=True` continues bit for bit: a step's batch
depends only on (seed, step), and weights, optimizer and RNG are restored exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from models import ModelConfig, Transformer
from models.flops import flops_per_token
from models.weights import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    load_config,
    save_state,
)
from tformer_cli import __version__
from tformer_cli.data.batches import BatchSampler
from tformer_cli.data.corpus import check_corpus_text, resolve_corpus
from tformer_cli.data.pretokenize import TokenData, pretokenize_cached
from tformer_cli.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from tformer_cli.device import DTYPES, matmul_peak_flops, resolve_device, resolve_precision
from tformer_cli.errors import TformerError
from tformer_cli.profiling.fit import require_fit
from tformer_cli.runs.locate import DEFAULT_RUNS_DIR
from tformer_cli.runs.rundir import BEST_DIR, METRICS_FILE, TOKENIZER_FILE, TRAIN_STATE_DIR
from tformer_cli.runs.target import (
    RUN_CARD_FILE,
    check_run_dir_use,
    claim_run_dir,
    clear_run_dir,
    refuse_output_over_inputs,
)
from tformer_cli.training.config import TrainConfig, default_vocab_size
from tformer_cli.training.distributed import DistInfo, init_distributed, shutdown_distributed
from tformer_cli.training.loss import lm_loss
from tformer_cli.training.optim import build_optimizer, default_warmup, lr_at
from tformer_cli.training.state import load_train_state, restore_rng, save_train_state

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)

Event = Callable[[str, dict[str, Any]], None]
Sampler = Callable[[Transformer, Tokenizer], str]


class TrainingDiverged(TformerError):
    """The loss became NaN or infinite."""


@dataclass
class RunState:
    """What changes as training goes; all of it goes into train_state/state.json."""

    step: int = 0
    total_steps: int = 0
    warmup: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_val_loss: float = math.inf
    best_step: int = -1
    last_saved_step: int = -1
    losses: list[float] = field(default_factory=list)  # one per log interval, for the sparkline

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if known.get("best_val_loss") is None:
            known["best_val_loss"] = math.inf
        return cls(**known)


@dataclass
class LoopSpec:
    """What the loop trains and how it saves: pretraining and fine-tuning differ only here."""

    model_cfg: ModelConfig
    build_model: Callable[
        [], torch.nn.Module
    ]  # called after seeding; trainable parameters require grad
    train_batches: Any  # .batch(step, batch_size, rows) -> (x, y), y = IGNORE where no loss
    val_batches: Any
    seq_len: int
    save_weights: Callable[
        [dict[str, torch.Tensor], Path, dict[str, Any]], None
    ]  # the inference files
    info: dict[str, Any]  # extra config.json fields
    bytes_per_token: float | None = None  # for bits per byte; None where it means nothing
    label: str | None = None  # what the run card calls the model (default: the preset)
    started: float = field(
        default_factory=time.perf_counter
    )  # when the command began: --time counts from here


def _noop(kind: str, data: dict[str, Any]) -> None:
    pass


# -- setting up -----------------------------------------------------------------------------------


STAGED_TOKENIZER = ".tokenizer.model.staged.tmp"  # a temporary name: a retry clears it


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
            on_event(
                "tokenizer_done", {"vocab_size": summary.vocab_size, "seconds": summary.seconds}
            )
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
        progress = lambda done, total: on_event("tokenize_progress", {"done": done, "total": total})  # noqa: E731
        data, hit = pretokenize_cached(
            corpus,
            tok,
            cache_dir,
            cfg.val_fraction,
            progress=progress,
            notice=lambda message: on_event("notice", {"message": message}),
        )
        on_event(
            "data",
            {"train_tokens": data.train_tokens, "val_tokens": data.val_tokens, "cached": hit},
        )
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


# -- the loop ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    sampler: BatchSampler,
    batches: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], Any],
    dist: DistInfo,
) -> float:
    """Mean loss over fixed validation windows (the same ones at every eval)."""
    model.eval()
    per_rank = max(1, batch_size // dist.world_size)
    total = 0.0
    for i in range(batches):
        rows = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
        x, y = sampler.batch(i, per_rank * dist.world_size, rows)
        with autocast():
            total += lm_loss(model, x.to(device), y.to(device)).item()
    model.train()
    return dist.mean(total / batches, device)


def check_finite(loss: float, grad_norm: float, state: RunState) -> None:
    """Raise TrainingDiverged naming what became NaN or infinite (the loss or the gradients)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    kept = (
        f"the last good checkpoint (step {state.last_saved_step}) is kept"
        if state.last_saved_step >= 0
        else "nothing was saved"
    )
    what = (
        f"the loss became {loss}"
        if not math.isfinite(loss)
        else f"the gradient norm became {grad_norm} (loss {loss:.4f})"
    )
    raise TrainingDiverged(
        f"{what} at step {state.step + 1}; {kept}; try a lower --lr (or --precision fp32)"
    )


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _trim_metrics(path: Path, last_step: int, on_event: Event) -> None:
    """On resume, forget metrics logged after the checkpoint, so the file reads as one run.

    A torn last line (what a crash mid-write leaves) is dropped with a notice; a damaged line
    elsewhere means the file was edited, and is refused naming the line.
    """
    if not path.is_file():
        return
    lines = [
        line
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
        if line.strip()
    ]
    kept = []
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            step = record["step"]
        except (ValueError, KeyError, TypeError):
            if n == len(lines):
                on_event(
                    "notice",
                    {
                        "message": f"{path}: dropped a torn last line (line {n}), as a crash leaves it"
                    },
                )
                break
            raise TformerError(
                f"{path}:{n}: not a metrics record; remove that line (or the file) to resume"
            ) from None
        if step <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _sparkline(values: list[float], width: int = 40) -> str:
    if not values:
        return ""
    if len(values) > width:
        chunk = len(values) / width
        values = [values[int(i * chunk)] for i in range(width)]
    lo, hi = min(values), max(values)
    bars = "▁▂▃▄▅▆▇█"
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in values)


def train(
    cfg: TrainConfig,
    corpus_paths: list[str | Path],
    run_dir: str | Path | None,
    cache_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    on_event: Event = _noop,
    stop: threading.Event | None = None,
    sampler: Sampler | None = None,
    runs_root: str | Path = DEFAULT_RUNS_DIR,
) -> dict[str, Any]:
    """Train a model on the corpus into run_dir; returns the run card (also saved as run_card.json).

    run_dir None names the run after the corpus under runs_root (runs/corpus, or the next free
    name); the run directory stays locked while this writes to it.
    """
    started = time.perf_counter()
    cfg.validate()
    cache_dir = Path(cache_dir)
    stop = stop or threading.Event()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    dist, device = init_distributed(device)
    if not dist.is_main:
        on_event = _noop
    target, failed = None, True
    try:
        # Everything is checked before anything is replaced: the corpus (read by the tokenizer
        # and the pre-tokeniser), the tokenizer, the model and its memory. Only then does an
        # --overwrite remove the run that was there.
        exclude = [Path(run_dir)] if run_dir is not None else []
        corpus = resolve_corpus([Path(p) for p in corpus_paths], exclude=exclude)
        chosen = None
        if dist.is_main:
            check_corpus_text(corpus)
            given = load_tokenizer(cfg.tokenizer) if cfg.tokenizer and not resume else None
            vocab = (
                given.vocab_size if given else cfg.vocab_size or default_vocab_size(_bytes(corpus))
            )
            expected = cfg.model_config(vocab)  # the model this run will build (its vocab, exactly)
            check_batch_fits(cfg, expected, cfg.context(expected), precision, device, dist)
            target = claim_run_dir(run_dir, corpus_paths, resume, overwrite, runs_root)
            check_run_dir_use(target.path, resume, overwrite)
            if not resume:
                refuse_output_over_inputs(
                    target.path, [*corpus, *([cfg.tokenizer] if cfg.tokenizer else [])]
                )
            chosen = str(target.path)
            on_event(
                "run_dir",
                {
                    "path": chosen,
                    "how": target.how,
                    "auto": target.auto,
                    "previous": str(target.previous) if target.previous else None,
                    "corpus": _corpus_label(corpus_paths[0]),
                },
            )
        run_dir = Path(dist.broadcast_text(chosen, device))  # every rank reads from rank 0's choice
        dist.barrier()
        tok = prepare_tokenizer(cfg, corpus, run_dir, resume, dist, on_event)
        data = prepare_data(corpus, tok, cache_dir, cfg, dist, on_event)
        model_cfg = cfg.model_config(tok.vocab_size)
        if resume:
            check_model_matches(run_dir, model_cfg)
        spec = pretraining_spec(cfg, model_cfg, tok, data)
        spec.started = started
        if dist.is_main:
            staged = None if resume else (run_dir / STAGED_TOKENIZER).read_bytes()
            clear_run_dir(run_dir, resume)
            if staged is not None:
                atomic_write_bytes(run_dir / TOKENIZER_FILE, staged)
        dist.barrier()
        card = run_loop(
            cfg, spec, tok, run_dir, device, precision, dist, resume, on_event, stop, sampler
        )
        failed = False
        return card
    finally:
        if target is not None:
            (target.path / STAGED_TOKENIZER).unlink(missing_ok=True)
            target.release(failed)
        shutdown_distributed(dist)


def check_batch_fits(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    seq_len: int,
    precision: str,
    device: torch.device,
    dist: DistInfo,
) -> None:
    """Refuse a batch the memory model says cannot fit, before a byte of it is allocated."""
    micro = max(1, cfg.batch_size // (dist.world_size * cfg.grad_accum))
    flag = f"--batch-size {cfg.batch_size}" + (
        f" (x{cfg.grad_accum} accumulation)" if cfg.grad_accum > 1 else ""
    )
    require_fit("train", model_cfg, seq_len, micro, precision, device, flag)


def _bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


def _corpus_label(path: str | Path) -> str:
    """How the run names its corpus: a file as given, a directory by its name (`.` says nothing)."""
    path = Path(path)
    return f"{path.resolve().name}/" if path.is_dir() else str(path)


def pretraining_spec(
    cfg: TrainConfig, model_cfg: ModelConfig, tok: Tokenizer, data: TokenData
) -> LoopSpec:
    """Random windows of the token file, a fresh model, full weights saved."""
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
        info={"tokenizer_sha256": tok.sha256},
        bytes_per_token=data.val_bytes / max(1, data.val_tokens),
    )


def run_loop(
    cfg: TrainConfig,
    spec: LoopSpec,
    tok: Tokenizer,
    run_dir: Path,
    device: torch.device,
    precision: str,
    dist: DistInfo,
    resume: bool,
    on_event: Event,
    stop: threading.Event,
    sampler: Sampler | None,
) -> dict[str, Any]:
    """The training loop shared by `train` and `finetune`; returns the run card."""
    model_cfg, seq_len, bytes_per_token = spec.model_cfg, spec.seq_len, spec.bytes_per_token
    train_batches, val_batches = spec.train_batches, spec.val_batches
    world = dist.world_size
    if cfg.batch_size % (world * cfg.grad_accum):
        raise TformerError(
            f"--batch-size {cfg.batch_size} must be divisible by processes x --grad-accum "
            f"({world} x {cfg.grad_accum})"
        )
    micro = cfg.batch_size // (world * cfg.grad_accum)

    torch.manual_seed(cfg.seed)
    raw_model = spec.build_model().to(device)
    if cfg.fsdp and dist.enabled:
        from torch.distributed.fsdp import fully_shard

        for block in raw_model.layers:  # shard before the optimizer sees the parameters
            fully_shard(block)
        fully_shard(raw_model)
    optimizer = build_optimizer(raw_model, cfg.lr, cfg.weight_decay, device)
    state = RunState()
    if resume:
        saved = load_train_state(run_dir / TRAIN_STATE_DIR)
        set_model_state_dict(raw_model, saved.model, options=StateDictOptions(strict=False))
        set_optimizer_state_dict(raw_model, optimizer, saved.optimizer, options=_FULL)
        state = RunState.from_json(saved.info["run"])
        state.step = saved.step
        if dist.is_main:
            _trim_metrics(run_dir / METRICS_FILE, state.step, on_event)
        on_event("resumed", {"step": state.step})

    model: torch.nn.Module = raw_model
    if dist.enabled and not cfg.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        model = torch.compile(model)

    use_amp = precision != "fp32"
    amp_dtype = DTYPES[precision]

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if use_amp else contextlib.nullcontext()

    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10
    # The budget covers the whole command: what setting up took (tokenizer, data) is spent already.
    budget = cfg.time - (time.perf_counter() - spec.started) if cfg.time else None
    if not resume:
        state.total_steps = cfg.max_steps or (10**9 if budget else 1000)
        state.warmup = cfg.warmup if cfg.warmup is not None else default_warmup(state.total_steps)
    elif cfg.max_steps:
        state.total_steps = cfg.max_steps
    peak = matmul_peak_flops(device, precision) if dist.is_main else 0.0
    flops_tok = flops_per_token(model_cfg, seq_len)
    n_params = model_cfg.num_params()
    n_trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    on_event(
        "start",
        {
            "params": n_params,
            "config": model_cfg.to_dict(),
            "seq_len": seq_len,
            "device": str(device),
            "precision": precision,
            "total_steps": state.total_steps,
            "start_step": state.step,
            "world_size": world,
            "budget": budget,
        },
    )

    metrics = open(run_dir / METRICS_FILE, "a", encoding="utf-8") if dist.is_main else None
    info_base = {"tformer_version": __version__, "train": cfg.to_dict(), **spec.info}

    def save(best: bool = False) -> None:
        # Every rank takes part in gathering (FSDP needs it); rank 0 writes.
        weights = get_model_state_dict(raw_model, options=_FULL)
        if model_cfg.tie_embeddings:
            weights.pop("head.weight", None)
        if best:
            if dist.is_main:
                best_dir = run_dir / BEST_DIR
                spec.save_weights(
                    weights,
                    best_dir,
                    {**info_base, "step": state.step, "val_loss": state.best_val_loss},
                )
                shutil.copyfile(run_dir / TOKENIZER_FILE, best_dir / TOKENIZER_FILE)
            return
        optim = get_optimizer_state_dict(raw_model, optimizer, options=_FULL)
        if dist.is_main:
            spec.save_weights(weights, run_dir, {**info_base, "step": state.step})
            save_train_state(
                run_dir / TRAIN_STATE_DIR, state.step, weights, optim, {"run": state.to_json()}
            )
            on_event("saved", {"step": state.step, "path": str(run_dir)})
        state.last_saved_step = state.step
        dist.barrier()

    def run_eval() -> dict[str, float]:
        t = time.perf_counter()
        val_loss = evaluate(
            model, val_batches, cfg.eval_batches, micro * world, device, autocast, dist
        )
        bpb = val_loss / math.log(2) / bytes_per_token if bytes_per_token else None
        record = {
            "step": state.step,
            "val_loss": val_loss,
            "val_bpb": bpb,
            "eval_seconds": time.perf_counter() - t,
        }
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        on_event("eval", record)
        if val_loss < state.best_val_loss:
            state.best_val_loss, state.best_step = val_loss, state.step
            save(best=True)
        return record

    def maybe_sample() -> None:
        if sampler is None or not dist.is_main:
            return
        nonlocal sample_seconds
        rng = torch.get_rng_state()  # sampling must not shift the training RNG (exact resume)
        t = time.perf_counter()
        try:
            raw_model.eval()
            on_event("sample", {"step": state.step, "text": sampler(raw_model, tok)})
        finally:
            raw_model.train()
            torch.set_rng_state(rng)
            sample_seconds = time.perf_counter() - t

    if resume:
        restore_rng(saved.rng)  # last, so nothing above shifts the dropout stream
    model.train()
    start_step, t_start = state.step, time.perf_counter()
    t_log, tokens_log = t_start, 0
    step_times: list[float] = []
    eval_seconds, last_eval, interrupted = 0.0, None, False
    sample_seconds = 1.0 if sampler else 0.0  # refined once a sample has been timed
    loss_acc, loss_n = 0.0, 0
    sample_every = cfg.eval_every if cfg.sample_every is None else cfg.sample_every
    try:
        while state.step < state.total_steps:
            if dist.any(stop.is_set(), device):
                interrupted = True
                break
            elapsed = time.perf_counter() - t_start
            if budget and step_times:
                settled = step_times[1:] or step_times  # the first step carries warm-up costs
                per_step = sorted(settled)[len(settled) // 2]
                # Room for one more step, the final eval (forward only: ~1/3 of a step per batch),
                # the closing sample and the save.
                final_eval = (
                    last_eval["eval_seconds"] if last_eval else cfg.eval_batches * per_step / 3
                )
                reserve = per_step + final_eval + sample_seconds + 0.5
                if dist.any(elapsed + reserve >= budget, device):
                    break
            t_step = time.perf_counter()
            lr = lr_at(state.step, cfg.lr, min_lr, state.warmup, state.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for a in range(cfg.grad_accum):
                first = (dist.rank * cfg.grad_accum + a) * micro
                x, y = train_batches.batch(state.step, cfg.batch_size, slice(first, first + micro))
                sync = a == cfg.grad_accum - 1 or not isinstance(
                    model, torch.nn.parallel.DistributedDataParallel
                )
                with contextlib.nullcontext() if sync else model.no_sync(), autocast():
                    loss = lm_loss(
                        model, x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    )
                scaler.scale(loss / cfg.grad_accum).backward()
                step_loss += loss.detach()
            scaler.unscale_(optimizer)
            # --grad-clip 0 turns clipping off; the norm is still measured for the log
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip or math.inf
            )
            loss_value = step_loss.item() / cfg.grad_accum
            if not scaler.is_enabled():
                check_finite(loss_value, float(grad_norm), state)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += cfg.batch_size * seq_len
            step_times.append(time.perf_counter() - t_step)
            step_times = step_times[-50:]
            tokens_log += cfg.batch_size * seq_len
            loss_acc, loss_n = loss_acc + loss_value, loss_n + 1

            ran = state.step - start_step
            if (
                budget
                and cfg.max_steps is None
                and (ran == 5 or (ran > 5 and state.step % cfg.log_every == 0))
            ):
                # Fit the LR schedule to the time budget from the recent step (and eval) cost, and
                # keep refitting: the machine may speed up or slow down under other load.
                recent = sorted(step_times[-20:])
                per_step = recent[len(recent) // 2] + eval_seconds / max(1, ran)
                remaining = budget - (time.perf_counter() - t_start)
                state.total_steps = state.step + max(1, int(remaining / per_step))
                if ran == 5 and cfg.warmup is None:
                    state.warmup = default_warmup(state.total_steps)
                on_event("schedule", {"total_steps": state.total_steps})

            if state.step % cfg.log_every == 0 or state.step == state.total_steps:
                now = time.perf_counter()
                rate = tokens_log / max(now - t_log, 1e-9)
                mean_loss = dist.mean(loss_acc / loss_n, device)
                record = {
                    "step": state.step,
                    "loss": mean_loss,
                    "lr": lr,
                    "tokens_per_s": rate * world,
                    "grad_norm": float(grad_norm),
                }
                state.losses.append(mean_loss)
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                on_event(
                    "step", {**record, "total_steps": state.total_steps, "elapsed": now - t_start}
                )
                t_log, tokens_log, loss_acc, loss_n = now, 0, 0.0, 0
            else:
                on_event(
                    "tick",
                    {"step": state.step, "total_steps": state.total_steps, "loss": loss_value},
                )

            if state.step % cfg.eval_every == 0 and state.step < state.total_steps:
                t_eval = time.perf_counter()
                last_eval = run_eval()
                eval_seconds += time.perf_counter() - t_eval
            if sample_every and state.step % sample_every == 0 and state.step < state.total_steps:
                maybe_sample()
            if state.step % cfg.save_every == 0 and state.step < state.total_steps:
                save()
    except KeyboardInterrupt:
        interrupted = True  # a second Ctrl-C arriving mid-step: the last completed step is saved
    finally:
        state.train_seconds += time.perf_counter() - t_start

    if not interrupted and (last_eval is None or last_eval["step"] != state.step):
        last_eval = run_eval()
    if not interrupted:
        maybe_sample()
    if state.step != state.last_saved_step:
        save()
    if metrics:
        metrics.close()

    wall = state.train_seconds
    steps_run = state.step - start_step
    tokens_per_s = steps_run * cfg.batch_size * seq_len / max(wall, 1e-9)
    card = {
        "run_dir": str(run_dir),
        "tformer_version": __version__,
        "preset": spec.label or cfg.preset,
        "params": n_params,
        "trainable_params": n_trainable,
        "model": model_cfg.to_dict(),
        "seq_len": seq_len,
        "batch_size": cfg.batch_size,
        "device": str(device),
        "precision": precision,
        "world_size": world,
        "steps": state.step,
        "total_steps": state.total_steps,
        "tokens_seen": state.tokens_seen,
        "best_val_loss": None if math.isinf(state.best_val_loss) else state.best_val_loss,
        "best_val_bpb": None
        if math.isinf(state.best_val_loss) or not bytes_per_token
        else state.best_val_loss / math.log(2) / bytes_per_token,
        "best_step": state.best_step,
        "final_val_loss": last_eval["val_loss"] if last_eval else None,
        "final_val_bpb": last_eval["val_bpb"] if last_eval else None,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_tok,
        "matmul_peak_flops": peak,
        "mfu": tokens_per_s * flops_tok / (peak * world) if peak else None,
        "peak_memory_bytes": _peak_memory(device),
        "wall_seconds": wall,
        "loss_sparkline": _sparkline(state.losses),
        "interrupted": interrupted,
        "saved": {"latest": str(run_dir), "best": str(run_dir / BEST_DIR)},
    }
    if dist.is_main:
        (run_dir / RUN_CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return card
