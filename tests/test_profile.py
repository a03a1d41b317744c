"""tformer profile: analytic figures by hand and against torch's counters, the JSON schema, the
CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models import ModelConfig, Transformer, save_model
from models.flops import flops_per_token
from tformer_cli.commands.profile import parse_seq_lens
from tformer_cli.device import DTYPES, auto_precision
from tformer_cli.profiling import analytic
from tformer_cli.profiling.fit import largest, will_it_fit
from tformer_cli.profiling.memory import PeakMemory
from tformer_cli.profiling.source import checkpoint_param_count

# 2 layers, 4 query heads of 4 dims sharing 2 key/value heads, SwiGLU 40 wide, tied embeddings
HAND = ModelConfig(
    vocab_size=100, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=40, max_seq_len=32
)
SMALL = dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=64)

HEADLINE_KEYS = {
    "params": int,
    "precision": str,
    "device": str,
    "flops_per_token": int,
    "kv_cache_bytes": int,
    "train_tokens_per_s": float,
    "mfu": float,
    "prefill_tokens_per_s": float,
    "decode_tokens_per_s": float,
    "decode_tokens_per_s_no_cache": float,
    "peak_memory_bytes": int,
}


# -- analytic, by hand -----------------------------------------------------------------------------


def test_params_by_hand_match_the_model_and_checkpoint(tmp_path):
    counts = HAND.param_counts()
    assert counts == {
        "embeddings": 100 * 16,
        "attention": 2 * (16 * 16 + 2 * 16 * 8 + 16 * 16),  # wq, wk + wv (2 heads x 4), wo
        "mlp": 2 * 3 * 16 * 40,
        "norms": (2 * 2 + 1) * 16,
        "head": 0,  # tied to the embeddings
    }
    model = Transformer(HAND)
    assert sum(counts.values()) == 7056 == sum(p.numel() for p in model.parameters())
    save_model(model, tmp_path)
    assert checkpoint_param_count(tmp_path / "model.safetensors") == 7056


def test_flops_by_hand_and_the_attention_crossover():
    split = analytic.flop_split(HAND, 32)
    assert split.attention_proj == 2 * 1536
    assert split.attention_scores == 4 * 2 * 4 * 4 * 32  # 4 * L * H * hd * T
    assert split.mlp == 2 * 3840 and split.head == 2 * 100 * 16
    assert split.forward == 18048 == flops_per_token(HAND, 32, training=False)
    assert split.training == 3 * 18048 == flops_per_token(HAND, 32)
    assert analytic.six_n(HAND) == 6 * (1536 + 3840 + 1600)
    # attention (3072 + 128 T) passes the MLP (7680) past T = 36; the scores alone past T = 60
    cross = analytic.attention_crossover(HAND)
    assert cross == {"attention": 37, "scores": 61}
    assert (
        analytic.flop_split(HAND, 37).attention
        > split.mlp
        >= analytic.flop_split(HAND, 36).attention
    )


def test_kv_cache_bytes_and_the_gqa_saving():
    assert analytic.kv_cache_bytes(HAND, 32, 3, 4) == 2 * 2 * 2 * 4 * 32 * 3 * 4
    assert analytic.kv_cache_bytes(HAND, 32, 3, 2, kv_heads=4) == 2 * analytic.kv_cache_bytes(
        HAND, 32, 3, 2
    )
    mem = analytic.inference_memory(HAND, 32, 3, "bf16")
    assert mem["kv_cache"] == 2 * 2 * 2 * 4 * 32 * 3 * 2 and mem["weights"] == 7056 * 2


def test_training_memory_parts():
    mem = analytic.training_memory(HAND, 32, 2, "fp32")
    assert mem["weights"] == mem["grads"] == 4 * 7056 and mem["optimizer"] == 8 * 7056
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    # the math path keeps a T x T probability matrix per head per layer: it grows faster than sdpa
    extra = [
        analytic.activation_bytes(HAND, t, 1, "fp32", "math")
        - analytic.activation_bytes(HAND, t, 1, "fp32")
        for t in (64, 128)
    ]
    assert extra[1] > 3.5 * extra[0]


# -- analytic, against torch's own counters --------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"n_kv_heads": 2},
        {
            "pos": "learned",
            "norm": "layernorm",
            "mlp": "gelu",
            "bias": True,
            "tie_embeddings": False,
        },
    ],
)
def test_forward_and_training_flops_match_flop_counter_mode(fields):
    cfg = ModelConfig(**{**SMALL, **fields})
    model = Transformer(cfg)
    # FlopCounterMode counts matmuls and SDPA over the full T x T square, as the analytic count
    # does; the math path makes the attention products plain matmuls on every torch version
    model.set_attention("math")
    B, T = 2, 64
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert counter.get_total_flops() == pytest.approx(
        analytic.flop_split(cfg, T).forward * B * T, rel=0.02
    )
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x).view(-1, cfg.vocab_size), x.view(-1)).backward()
    assert counter.get_total_flops() == pytest.approx(
        analytic.flop_split(cfg, T).training * B * T, rel=0.03
    )


def _saved_bytes(cfg: ModelConfig, T: int, B: int, precision: str, impl: str) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for one training forward pass."""
    model = Transformer(cfg)
    model.set_attention(impl)
    x, y = torch.randint(0, cfg.vocab_size, (2, B, T))
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with amp:
            logits = model(x)
        F.cross_entropy(logits.float().view(-1, cfg.vocab_size), y.view(-1))
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize(
    "fields",
    [
        {"n_kv_heads": 2},
        {"pos": "sinusoidal", "norm": "layernorm", "mlp": "gelu", "n_kv_heads": 1},
    ],
)
def test_activation_estimate_matches_what_autograd_saves(fields, impl, precision):
    cfg = ModelConfig(**{**SMALL, **fields})
    got = _saved_bytes(cfg, 48, 2, precision, impl)
    assert analytic.activation_bytes(cfg, 48, 2, precision, impl) == pytest.approx(got, rel=0.01)


# -- will it fit, memory tracking ------------------------------------------------------------------


def test_largest_is_the_edge_of_a_monotone_predicate():
    assert largest(lambda n: n <= 37, 1000) == 37
    assert largest(lambda n: n <= 5000, 1000) == 1000
    assert largest(lambda n: False, 1000) == 0


def test_will_it_fit_gives_the_largest_batch_and_context():
    budget = analytic.training_memory(HAND, 32, 8, "fp32")["total"]
    fit = will_it_fit(HAND, 32, 4, "fp32", free_bytes=int(budget / 0.9) + 1)
    train = fit["train"]
    assert train["fits"] and train["max_batch_size"] == 8
    assert analytic.training_memory(HAND, train["max_seq_len"], 4, "fp32")["total"] <= budget
    assert analytic.training_memory(HAND, train["max_seq_len"] + 1, 4, "fp32")["total"] > budget
    tight = will_it_fit(HAND, 32, 4, "fp32", free_bytes=1000)
    assert not tight["train"]["fits"] and tight["train"]["max_batch_size"] == 0 and tight["notes"]


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(16 * 2**20)  # 64 MiB, touched
        del x
    if mem.method == "rss_hwm":
        assert mem.peak >= 0.9 * 64 * 2**20
    else:
        assert mem.peak is None or mem.peak >= 0


def test_parse_seq_lens():
    assert parse_seq_lens("2048") == [2048]
    assert parse_seq_lens("256, 512,1024") == [256, 512, 1024]


# -- the command -----------------------------------------------------------------------------------


def _run_dir(tmp_path: Path, **fields) -> Path:
    run = tmp_path / "run"
    save_model(Transformer(ModelConfig(**{**SMALL, **fields})), run)
    return run


QUICK_NANO = (
    "profile",
    "--preset",
    "nano",
    "--seq-len",
    "64",
    "--quick",
    "--device",
    "cpu",
    "--json",
)


def test_quick_profile_json_schema(cli, tmp_path):
    out = tmp_path / "profile.json"
    result = cli(*QUICK_NANO, out)
    assert result.exit_code == 0, result.stderr
    for title in (
        "1. Model",
        "2a. Analytic FLOPs",
        "2b. Analytic memory",
        "3. Measured",
        "3b. Attention",
        "4. Will it fit",
    ):
        assert title in result.stdout
    data = json.loads(out.read_text())
    for key, kind in HEADLINE_KEYS.items():
        assert isinstance(data[key], kind), key
        if kind is not str:
            assert data[key] > 0, key
    cfg = ModelConfig.from_dict(data["model"]["config"])
    assert data["params"] == cfg.num_params() == sum(data["params_by_component"].values())
    auto, _ = auto_precision(torch.device("cpu"), "inference")  # what this machine's rule picks
    assert data["precision"] == auto and data["device"] == "cpu" and data["seq_len"] == 64
    assert data["flops_per_token"] == flops_per_token(cfg, 64)
    elem = DTYPES[auto].itemsize
    assert (
        data["kv_cache_bytes"] == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 64 * 1 * elem
    )
    assert data["decode_tokens_per_s"] > 0 and data["decode_cache_speedup"] > 0
    assert 0 < data["mfu"] and data["decode_bandwidth_utilization"] > 0
    assert set(data["measured"]["attention"]) == {"sdpa", "math"}
    assert all(data["measured"]["attention"].values())
    assert data["fit"]["train"]["fits"] and data["fit"]["train"]["max_batch_size"] >= 1
    assert data["skipped"] == []


def test_run_dir_params_equal_the_checkpoint_and_measure_past_max_seq_len(cli, tmp_path):
    run = _run_dir(tmp_path, tie_embeddings=False)
    result = cli(
        "profile", "-m", run, "--seq-len", "32,96", "--quick", "--device", "cpu", "--json", "-"
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (
        data["params"]
        == data["checkpoint_params"]
        == checkpoint_param_count(run / "model.safetensors")
    )
    assert data["model"]["source"] == "run" and data["seq_len"] == 96
    assert any("max_seq_len raised from 64 to 96" in n for n in data["notes"])
    assert [row["seq_len"] for row in data["scaling"]] == [32, 96]
    assert all(row["train_step_s"] > 0 and row["predicted_step_s"] > 0 for row in data["scaling"])


def test_learned_positions_past_max_seq_len_keep_the_analytic_part(cli, tmp_path):
    run = _run_dir(tmp_path, pos="learned")
    result = cli(
        "profile", "-m", run, "--seq-len", "128", "--quick", "--device", "cpu", "--json", "-"
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["params"] == data["checkpoint_params"]
    assert data["train_tokens_per_s"] is None and data["flops_per_token"] > 0
    assert "learned position embeddings" in data["skipped"][0]["reason"]


def test_what_does_not_fit_is_skipped_with_the_reason(cli, monkeypatch, tmp_path):
    from tformer_cli.profiling import report

    monkeypatch.setattr(report, "available_memory", lambda device: 2**16)  # 64 KiB free
    out = tmp_path / "p.json"
    result = cli(*QUICK_NANO, out)
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["train_tokens_per_s"] is None and data["decode_tokens_per_s"] is None
    assert len(data["skipped"]) == 4 and all("free" in s["reason"] for s in data["skipped"])
    assert not data["fit"]["train"]["fits"] and data["fit"]["notes"]
    assert "skipped: training step at T=64" in result.stdout


def test_config_file_toml_with_preset_and_overrides(cli, tmp_path):
    toml = tmp_path / "model.toml"
    toml.write_text(
        'preset = "nano"\n[model]\nn_layers = 2\nvocab_size = 512\n\n[train]\nlr = 1e-3\n'
    )
    result = cli("profile", "--config", toml, "--no-measure", "--json", "-")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"]["config"]["n_layers"] == 2 and data["model"]["config"]["dim"] == 96
    assert data["seq_len"] == 256 and data["measured"] == {} and data["mfu"] is None
    js = tmp_path / "model.json"
    js.write_text(json.dumps({"model": {**SMALL, "n_kv_heads": 2}}))
    data = json.loads(cli("profile", "--config", js, "--no-measure", "--json", "-").stdout)
    assert data["params"] == ModelConfig(**SMALL, n_kv_heads=2).num_params()
    assert data["kv_cache_gqa_saving"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("-m", "/nonexistent/run", "--preset", "nano"),
            "exactly one of -m RUN_DIR, --preset NAME or --config FILE",
        ),
        (("--preset", "nano", "--config", "x.toml"), "exactly one of"),
        (("--preset", "nope"), "unknown preset"),
        (("--preset", "nano", "--seq-len", "abc"), "--seq-len"),
        (("--preset", "nano", "--seq-len", "0"), "--seq-len"),
        (("--preset", "nano", "--batch-size", "0"), "--batch-size"),
        (("-m", "/nonexistent/run"), "no such run directory"),
        (("--config", "/nonexistent.toml"), "config file not found"),
    ],
)
def test_bad_input_is_one_clear_line(cli, args, message):
    result = cli("profile", *args, "--no-measure")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_bad_config_field_names_the_file(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\ndimension = 64\n")
    result = cli("profile", "--config", bad, "--no-measure")
    assert result.exit_code == 1 and str(bad) in result.stderr and "dimension" in result.stderr
