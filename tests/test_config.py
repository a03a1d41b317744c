"""Config validation and preset sizes."""

from __future__ import annotations

import pytest
import torch

from models import PRESETS, ConfigError, ModelConfig, Transformer, get_preset


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_count_equals_its_formula(name):
    cfg = get_preset(name)
    with torch.device("meta"):  # count without allocating 124M floats
        model = Transformer(cfg)
    counted = sum(p.numel() for p in model.parameters())  # shared (tied) tensors once
    assert counted == cfg.num_params()


def test_documented_preset_sizes():
    # The comments in models/presets.py quote these; keep them in step.
    assert get_preset("small").num_params() == 15_191_712
    assert get_preset("gpt2").num_params() == 124_439_808  # GPT-2 small's well-known count
    assert get_preset("nano").num_params() < 1_000_000
    assert get_preset("small-gqa").n_kv_heads == 2


def test_small_is_the_stories15m_shape():
    cfg = get_preset("small")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.hidden_dim, cfg.vocab_size) == (
        288,
        6,
        6,
        768,
        32000,
    )
    assert cfg.max_seq_len >= 256


def test_param_counts_split_by_component():
    cfg = ModelConfig(
        vocab_size=10,
        dim=8,
        n_layers=1,
        n_heads=2,
        hidden_dim=16,
        tie_embeddings=False,
        max_seq_len=4,
    )
    counts = cfg.param_counts()
    assert counts == {
        "embeddings": 80,
        "attention": 4 * 64,
        "mlp": 3 * 128,
        "norms": 3 * 8,
        "head": 80,
    }


def test_overrides_replace_preset_fields():
    cfg = get_preset("nano", vocab_size=8000, max_seq_len=None)
    assert cfg.vocab_size == 8000 and cfg.max_seq_len == 256


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(dim=100, n_heads=3), "dim 100 is not divisible by n_heads 3"),
        (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
        (dict(norm="batchnorm"), "norm must be one of rmsnorm, layernorm"),
        (dict(pos="alibi"), "pos must be one of rope, learned, sinusoidal"),
        (dict(mlp="relu"), "mlp must be one of swiglu, gelu"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(dim=30, n_heads=2, head_dim=15), "rope needs an even head_dim"),
    ],
)
def test_invalid_configs_say_what_is_wrong(kw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**kw)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*nano"):
        get_preset("huge")


def test_derived_fields():
    cfg = ModelConfig(dim=128, n_heads=4)
    assert (cfg.head_dim, cfg.n_kv_heads, cfg.hidden_dim) == (32, 4, 352)
    assert ModelConfig(dim=128, n_heads=4, mlp="gelu").hidden_dim == 512
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
