"""--preset auto: with --time and no shape, the model, lr and batch the budget buys, recorded."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import write_corpus

from tformer_cli.errors import TformerError
from tformer_cli.training import auto
from tformer_cli.training.budget import TimeBudget
from tformer_cli.training.config import DEFAULT_PRESET, TrainConfig, load_train_config
from tformer_cli.training.context import RunContext
from tformer_cli.training.distributed import DistInfo
from tformer_cli.training.pretrain import resolve_auto

VOCAB = 2048


def test_a_budget_without_a_shape_is_auto_and_anything_else_is_not(tmp_path):
    assert load_train_config(None, {"time": 90.0}).preset == auto.AUTO
    assert load_train_config(None, {}).preset == DEFAULT_PRESET  # no --time: the fixed default
    assert load_train_config(None, {"time": 90.0, "preset": "nano"}).preset == "nano"
    shaped = tmp_path / "shape.toml"
    shaped.write_text("[model]\ndim = 64\n")
    assert load_train_config(shaped, {"time": 90.0}).preset == DEFAULT_PRESET


def test_preset_auto_without_a_budget_is_one_line():
    with pytest.raises(TformerError, match="--preset auto sizes the model to a time budget"):
        load_train_config(None, {"preset": "auto"})


def test_the_choice_grows_with_the_budget_and_keeps_enough_tokens_per_parameter():
    peak = 200e9
    names = [rung.name for rung in auto.LADDER]
    picked = [auto.choose(s, peak, VOCAB) for s in (1, 60, 90, 600, 3600, 36000, 360000)]
    order = [names.index(c.rung) for c in picked]
    assert order == sorted(order) and order[0] == 0 and order[-1] == len(names) - 1
    for c, i in zip(picked, order, strict=True):
        rung = auto.LADDER[i]
        n = auto.rung_config(rung, VOCAB).num_params()
        enough = auto.budget_tokens(rung, c.budget_s, peak, VOCAB) / n >= auto.MIN_TOKENS_PER_PARAM
        assert enough or i == 0  # the smallest rung only when nothing sees enough tokens
        if i + 1 < len(auto.LADDER):  # and the next rung up would not have seen enough
            up = auto.LADDER[i + 1]
            more = auto.budget_tokens(up, c.budget_s, peak, VOCAB)
            assert more / auto.rung_config(up, VOCAB).num_params() < auto.MIN_TOKENS_PER_PARAM
        assert f"{c.budget_s:.0f} s" in c.why and "tokens per parameter" in c.why
        assert (c.lr, c.batch_size, c.model) == (rung.lr, rung.batch_size, rung.model)
    assert auto.choose(90, peak, VOCAB) == auto.choose(90, peak, VOCAB)  # a rule, not a timing
    faster = auto.choose(90, 4 * peak, VOCAB)  # a faster device buys a model at least as big
    assert names.index(faster.rung) >= names.index(picked[2].rung)


def test_dropout_only_when_the_budget_reads_the_text_many_times():
    peak, budget = 200e9, 600.0
    tokens = auto.budget_tokens(
        next(r for r in auto.LADDER if r.name == auto.choose(budget, peak, VOCAB).rung),
        budget,
        peak,
        VOCAB,
    )
    many = auto.choose(budget, peak, VOCAB, train_tokens=int(tokens / 10))  # 10 epochs
    few = auto.choose(budget, peak, VOCAB, train_tokens=int(tokens / 2))  # 2 epochs
    assert many.dropout == auto.DROPOUT and "dropout" in many.why
    assert few.dropout == 0.0 and "dropout" not in few.why
    assert auto.choose(budget, peak, VOCAB).dropout == 0.0  # corpus size unknown: none


def _ctx(cfg: TrainConfig, run_dir, resume: bool) -> RunContext:
    return RunContext(
        cfg=cfg,
        device=torch.device("cpu"),
        precision="fp32",
        dist=DistInfo(),
        budget=TimeBudget(cfg.time),
        resume=resume,
        run_dir=run_dir,
    )


def test_resolving_applies_the_rung_but_a_given_flag_wins(tmp_path, monkeypatch):
    monkeypatch.setattr("tformer_cli.training.pretrain.matmul_peak_flops", lambda d, p: 200e9)
    cfg = resolve_auto(_ctx(load_train_config(None, {"time": 90.0}), tmp_path, False), VOCAB)
    want = auto.choose(90.0, 200e9, VOCAB)
    assert cfg.preset == auto.BASE_PRESET and cfg.model == want.model
    assert (cfg.lr, cfg.batch_size) == (want.lr, want.batch_size)
    assert cfg.auto == want.to_dict()
    given = load_train_config(None, {"time": 90.0, "lr": 5e-4, "batch_size": 4})
    cfg = resolve_auto(_ctx(given, tmp_path, False), VOCAB)
    assert (cfg.lr, cfg.batch_size) == (5e-4, 4) and cfg.model == want.model
    tiny_corpus = resolve_auto(_ctx(given, tmp_path, False), VOCAB, train_tokens=1000)
    assert tiny_corpus.dropout == auto.DROPOUT == tiny_corpus.auto["dropout"]
    given = load_train_config(None, {"time": 90.0, "dropout": 0.0})
    assert resolve_auto(_ctx(given, tmp_path, False), VOCAB, train_tokens=1000).dropout == 0.0


def test_a_run_records_the_choice_shows_it_and_resume_reuses_it(cli, tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.txt", 60_000)
    out = tmp_path / "run"
    args = ("train", corpus, "-o", out, "--time", "20s", "--vocab-size", "512", "--seq-len", "32")
    fast = ("--batch-size", "4", "--eval-every", "5", "--eval-batches", "1", "--max-steps", "5")
    res = cli(*args, *fast, "--cache-dir", tmp_path / "cache", "--json")
    assert res.exit_code == 0, res.stderr
    card = json.loads(res.stdout)
    recorded = json.loads((out / "config.json").read_text())["train"]["auto"]
    assert card["auto"] == recorded and card["preset"] == recorded["rung"]
    assert card["model"]["dim"] == recorded["model"]["dim"]
    assert "--preset auto:" in res.stderr
    # resuming takes the recorded shape: a different measurement must not change the model
    monkeypatch.setattr("tformer_cli.training.pretrain.matmul_peak_flops", lambda d, p: 1e15)
    cfg = resolve_auto(_ctx(load_train_config(None, {"time": 20.0}), out, True), 512)
    assert cfg.auto == recorded and cfg.model == recorded["model"]
