"""`tformer train`: the run directory, learning, exact resume, time budget, errors."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
from fixtures import write_corpus
from safetensors.torch import load_file

from tformer_cli.training.config import TrainConfig, load_train_config, parse_duration
from tformer_cli.training.pretrain import train

FAST = [
    "--preset",
    "nano",
    "--batch-size",
    "4",
    "--seq-len",
    "64",
    "--eval-batches",
    "2",
    "--quiet",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first ~150 KB of the fixture corpus: enough to learn from, quick to tokenise."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "shakespeare.txt", 150_000)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="module")
def trained(corpus, cache, tmp_path_factory):
    """One real CLI run shared by several tests: 120 steps of nano with evals every 30."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("runs") / "nano"
    res = run_cli(
        "train",
        corpus,
        "-o",
        out,
        *FAST,
        "--vocab-size",
        "512",
        "--max-steps",
        "120",
        "--eval-every",
        "30",
        "--cache-dir",
        cache,
        "--json",
    )
    assert res.exit_code == 0, res.stderr
    return out, json.loads(res.stdout), res


def test_run_dir_holds_the_documented_files(trained):
    out, card, _ = trained
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "metrics.jsonl",
        "run_card.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "train_state" / "state.json").is_file()
    assert (out / "best" / "model.safetensors").is_file() and (
        out / "best" / "tokenizer.model"
    ).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "tformer" and config["model"]["vocab_size"] == 512
    assert config["step"] == 120
    assert json.loads((out / "run_card.json").read_text()) == card


def test_validation_loss_falls_and_metrics_are_logged(trained):
    out, card, _ = trained
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(10, 121, 10))
    assert all({"step", "loss", "lr", "tokens_per_s"} <= r.keys() for r in steps)
    assert [r["step"] for r in evals] == [30, 60, 90, 120]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    assert evals[-1]["val_loss"] < math.log(512)
    assert all(0 < r["val_bpb"] < 10 for r in evals)
    assert card["final_val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert card["best_val_loss"] == min(r["val_loss"] for r in evals)
    assert card["steps"] == 120 and card["tokens_seen"] == 120 * 4 * 64
    assert card["params"] == sum(t.numel() for t in load_file(out / "model.safetensors").values())
    assert card["mfu"] > 0 and card["peak_memory_bytes"] > 0


def test_lr_schedule_warms_up_then_decays(trained):
    out, _, _ = trained
    lrs = [
        json.loads(line)["lr"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"lr"' in line
    ]
    peak = max(lrs)
    assert lrs.index(peak) <= 2 and lrs[-1] == pytest.approx(
        1e-4, rel=0.01
    )  # decays to min-lr = lr/10
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))


def test_second_run_reuses_the_token_cache(trained, corpus, cache, cli, tmp_path):
    out, _, _ = trained
    tok = out / "tokenizer.model"
    for name in ("again", "third"):
        args = ["-o", tmp_path / name, *FAST, "--tokenizer", tok, "--max-steps", "2"]
        res = cli("train", corpus, *args, "--cache-dir", cache)
        assert res.exit_code == 0, res.stderr
    assert "data (cached)" in res.stderr


def _weights(path):
    return load_file(path / "model.safetensors")


def test_interrupt_then_resume_ends_bit_for_bit_where_the_uninterrupted_run_does(
    trained, corpus, cache, tmp_path
):
    tok = str(trained[0] / "tokenizer.model")
    cfg = dict(
        preset="nano",
        tokenizer=tok,
        batch_size=4,
        seq_len=64,
        max_steps=25,
        eval_every=10,
        eval_batches=2,
        save_every=100,
        dropout=0.1,
    )
    train(TrainConfig(**cfg), [corpus], tmp_path / "straight", cache)

    stop = threading.Event()

    def on_event(kind, data):
        if kind in ("step", "tick") and data["step"] == 13:
            stop.set()  # what Ctrl-C does

    card = train(
        TrainConfig(**cfg), [corpus], tmp_path / "split", cache, on_event=on_event, stop=stop
    )
    assert card["interrupted"] and card["steps"] == 13
    card = train(TrainConfig(**cfg), [corpus], tmp_path / "split", cache, resume=True)
    assert card["steps"] == 25 and not card["interrupted"]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps)  # the resumed run's log continues, no duplicates


class _VirtualClock:
    """A perf_counter that advances a fixed tick per reading: the budget logic sees the same
    times however busy the machine is, so the test does not depend on its speed."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_time_budget_stops_evaluates_and_saves(trained, corpus, cache, cli, tmp_path, monkeypatch):
    import types

    import tformer_cli.training.budget as budget

    monkeypatch.setattr(
        budget, "time", types.SimpleNamespace(perf_counter=_VirtualClock(0.02).perf_counter)
    )
    res = cli(
        "train",
        corpus,
        "-o",
        tmp_path / "timed",
        *FAST,
        "--tokenizer",
        trained[0] / "tokenizer.model",
        "--time",
        "4s",
        "--cache-dir",
        cache,
        "--json",
    )
    assert res.exit_code == 0, res.stderr
    card = json.loads(res.stdout)
    assert card["steps"] > 5, card["steps"]
    assert card["total_steps"] < 10**6  # the schedule was fitted to the budget
    assert card["final_val_loss"] is not None
    assert json.loads((tmp_path / "timed" / "config.json").read_text())["step"] == card["steps"]


class _ManualClock:
    """A clock that reads what the test sets."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_budget_reserves_room_to_finish_and_fits_the_schedule():
    from tformer_cli.training.budget import TimeBudget

    clock = _ManualClock()
    budget = TimeBudget(100.0, clock=clock)
    clock.now = 10.0  # setting up (tokenizer, data) took 10 s of the 100
    budget.settle()
    assert budget.left == 90.0 and budget.limited
    budget.start(eval_batches=6, sampling=True)  # the loop starts at 10 s
    asked = []

    def any_rank(flag):
        asked.append(flag)
        return flag

    assert not budget.out_of_time(None, any_rank) and asked == []  # no step timed yet
    for seconds in (5.0, 2.0, 2.0, 2.0, 2.0):  # the first step carries warm-up costs
        with budget.timing_step():
            clock.now += seconds
    # Reserve: a step (2) + the final eval estimated at 6 batches x 2 / 3 (4) + a sample (1,
    # until one is timed) + the save (0.5) = 7.5 s.
    clock.now = 10.0 + 82.0
    assert not budget.out_of_time(None, any_rank) and asked == [False]
    clock.now = 10.0 + 83.0
    assert budget.out_of_time(None, any_rank) and asked == [False, True]
    clock.now = 10.0 + 82.0  # a measured eval replaces the estimate: 2 + 4.5 + 1 + 0.5 = 8
    assert budget.out_of_time({"eval_seconds": 4.5}, any_rank)

    clock.now = 10.0 + 20.0  # 70 s left at 2 s a step: 35 more steps
    assert budget.fit(step=4, ran=4, every=10) is None  # not due before the 5th step
    assert budget.fit(step=5, ran=5, every=10) == 5 + 35
    with budget.timing_eval():
        clock.now += 5.0  # evals are spread over the steps run: 2 + 5 / 10 a step
    clock.now = 10.0 + 45.0
    assert budget.fit(step=11, ran=11, every=10) is None  # due every 10 steps after the 5th
    assert budget.fit(step=10, ran=10, every=10) == 10 + 18  # 45 s at 2.5 s a step
    with pytest.raises(RuntimeError), budget.timing_sample():
        clock.now += 3.0
        raise RuntimeError  # a failed sample still counts what it cost
    assert budget.sample_seconds == 3.0

    free = TimeBudget(None, clock=clock)  # no --time: the budget only measures
    free.settle()
    free.start(eval_batches=6, sampling=False)
    with free.timing_step():
        clock.now += 1.0
    assert not free.limited and free.left is None
    assert not free.out_of_time(None, any_rank) and free.fit(step=5, ran=5, every=10) is None
    assert free.elapsed() == 1.0


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(
    trained, corpus, cache, cli, tmp_path, monkeypatch
):
    import tformer_cli.training.loop as trainer

    real, calls = trainer.lm_loss, {"n": 0}

    def poisoned(model, x, y):
        loss = real(model, x, y)
        if model.training:
            calls["n"] += 1
            if calls["n"] > 6:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer, "lm_loss", poisoned)
    out = tmp_path / "nan"
    res = cli(
        "train",
        corpus,
        "-o",
        out,
        *FAST,
        "--tokenizer",
        trained[0] / "tokenizer.model",
        "--max-steps",
        "20",
        "--save-every",
        "5",
        "--cache-dir",
        cache,
    )
    assert res.exit_code == 1
    assert "loss became nan at step 7" in res.stderr and "step 5" in res.stderr
    assert "Traceback" not in res.stderr
    assert json.loads((out / "config.json").read_text())["step"] == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.txt"], "missing.txt"),
        (["{corpus}", "--preset", "huge"], "unknown preset 'huge'"),
        (["{corpus}", "--seq-len", "20000", "--batch-size", "1"], "corpus too small"),
        (["{corpus}", "--time", "ten minutes"], "--time 'ten minutes'"),
        (["{corpus}", "--batch-size", "6", "--grad-accum", "4"], "multiple of --grad-accum"),
    ],
)
def test_bad_input_is_one_line(args, message, trained, corpus, cache, cli, tmp_path):
    args = [a.replace("{corpus}", str(corpus)) for a in args]
    res = cli(
        "train",
        *args,
        "-o",
        tmp_path / "run",
        "--quiet",
        "--max-steps",
        "1",
        "--tokenizer",
        trained[0] / "tokenizer.model",
        "--cache-dir",
        cache,
    )
    assert res.exit_code == 1, res.stdout
    last = res.stderr.splitlines()[-1]
    assert last.startswith("error: ") and message in last, res.stderr
    assert res.stderr.count("error: ") == 1 and "Traceback" not in res.stderr


def test_empty_corpus_is_refused(cli, tmp_path, cache):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = cli("train", empty, "-o", tmp_path / "run", "--quiet", "--cache-dir", cache)
    assert res.exit_code == 1 and "empty" in res.stderr


def test_existing_run_is_not_clobbered_and_resume_needs_a_checkpoint(
    trained, corpus, cache, cli, tmp_path
):
    out, _, _ = trained
    before = (out / "model.safetensors").read_bytes()
    res = cli("train", corpus, "-o", out, *FAST, "--max-steps", "1", "--cache-dir", cache)
    assert res.exit_code == 1 and "--resume" in res.stderr and "--overwrite" in res.stderr
    assert (out / "model.safetensors").read_bytes() == before
    res = cli("train", corpus, "-o", tmp_path / "fresh", *FAST, "--resume", "--cache-dir", cache)
    assert res.exit_code == 1 and "nothing to resume" in res.stderr


def test_resume_with_a_different_model_is_refused(trained, corpus, cache, cli):
    out, _, _ = trained
    res = cli(
        "train",
        corpus,
        "-o",
        out,
        *FAST,
        "--preset",
        "micro",
        "--resume",
        "--max-steps",
        "121",
        "--cache-dir",
        cache,
    )
    assert (
        res.exit_code == 1
        and "holds a different model" in res.stderr
        and "dim 96 vs 128" in res.stderr
    )


def test_toml_config_then_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'preset = "tiny"\n[train]\nlr = 3e-4\nbatch_size = 8\ntime = "2m"\n'
        "[model]\ndim = 128\nn_heads = 4\n"
    )
    cfg = load_train_config(path, {"lr": 1e-3, "seed": None})
    assert (cfg.preset, cfg.lr, cfg.batch_size, cfg.time) == ("tiny", 1e-3, 8, 120.0)
    model = cfg.model_config(vocab_size=300)
    assert (model.dim, model.n_heads, model.vocab_size, model.n_layers) == (128, 4, 300, 6)


def test_durations():
    assert [parse_duration(t) for t in ("90", "90s", "10m", "1.5h")] == [90, 90, 600, 5400]


def test_batches_depend_only_on_seed_and_step():
    import numpy as np

    from tformer_cli.data.batches import BatchSampler

    tokens = np.arange(1000, dtype=np.uint16)
    s = BatchSampler(tokens, 16, seed=3)
    x, y = s.batch(7, 8)
    assert torch.equal(y[:, :-1], x[:, 1:])
    x2, _ = BatchSampler(tokens, 16, seed=3).batch(7, 8, slice(4, 8))
    assert torch.equal(x[4:], x2)  # a rank's slice equals the same rows of the global batch
    assert not torch.equal(x, s.batch(8, 8)[0])
