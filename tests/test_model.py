"""The network: cached decoding, causality, attention paths, padding, GQA, positions."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, Transformer

VARIANTS = {
    "rope": dict(pos="rope"),
    "learned": dict(pos="learned"),
    "sinusoidal": dict(pos="sinusoidal"),
    "gqa": dict(pos="rope", n_heads=4, n_kv_heads=2),
    "mqa": dict(pos="rope", n_heads=4, n_kv_heads=1),
    "gpt2-style": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),
}


def tiny(**kw) -> Transformer:
    cfg = ModelConfig(
        **{**dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=64), **kw}
    )
    return Transformer(cfg).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_forward(variant):
    model = tiny(**VARIANTS[variant])
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch_size=2)
        steps = [model(idx[:, :10], cache=cache, start=0)]  # prefill
        for t in range(10, 24):  # then one token at a time
            steps.append(model(idx[:, t : t + 1], cache=cache, start=t))
    cached = torch.cat(steps, dim=1)
    assert cached.shape == full.shape
    assert torch.allclose(cached, full, atol=1e-5, rtol=0), (cached - full).abs().max()


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_prefill_into_cache_equals_full_forward(variant):
    # A second prefill at start > 0 (a new chat turn) needs the offset causal mask.
    model = tiny(**VARIANTS[variant])
    idx = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(batch_size=1)
        a = model(idx[:, :12], cache=cache, start=0)
        b = model(idx[:, 12:], cache=cache, start=12)
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality_later_tokens_never_change_earlier_logits(variant):
    model = tiny(**VARIANTS[variant])
    idx = torch.randint(0, 97, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :12], b[:, :12]) or torch.allclose(
        a[:, :12], b[:, :12], atol=1e-6, rtol=0
    )
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize("variant", ["rope", "gqa", "learned"])
def test_sdpa_equals_math_attention(variant):
    model = tiny(**VARIANTS[variant])
    idx = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        sdpa = model(idx)
        model.set_attention("math")
        math = model(idx)
        cache = model.new_cache(batch_size=2)
        math_cached = torch.cat(
            [model(idx[:, :20], cache=cache), model(idx[:, 20:], cache=cache, start=20)], 1
        )
    assert torch.allclose(sdpa, math, atol=1e-5, rtol=0)
    assert torch.allclose(math_cached, math, atol=1e-5, rtol=0)


def test_set_attention_rejects_unknown_impl():
    with pytest.raises(ValueError, match="sdpa"):
        tiny().set_attention("flash3")


@pytest.mark.parametrize("variant", ["rope", "learned", "gqa"])
def test_left_padded_batch_rows_equal_unbatched_rows(variant):
    model = tiny(**VARIANTS[variant])
    short, long = torch.randint(0, 97, (5,)), torch.randint(0, 97, (9,))
    pad = 4
    idx = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), short]), long])  # (2, 9)
    key_mask = torch.ones(2, 16, dtype=torch.bool)
    key_mask[0, :pad] = False
    pos = torch.stack([(torch.arange(9) - pad).clamp(min=0), torch.arange(9)])
    with torch.no_grad():
        cache = model.new_cache(batch_size=2, max_len=16)
        batched = model(idx, cache=cache, start=0, pos=pos, key_mask=key_mask)
        nxt = torch.tensor([[3], [5]])
        step = model(nxt, cache=cache, start=9, pos=pos[:, -1:] + 1, key_mask=key_mask)
        alone_short = model(torch.cat([short, torch.tensor([3])])[None])
        alone_long = model(torch.cat([long, torch.tensor([5])])[None])
    assert torch.allclose(batched[0, pad:], alone_short[0, :5], atol=1e-5, rtol=0)
    assert torch.allclose(batched[1], alone_long[0, :9], atol=1e-5, rtol=0)
    assert torch.allclose(step[0, 0], alone_short[0, 5], atol=1e-5, rtol=0)
    assert torch.allclose(step[1, 0], alone_long[0, 9], atol=1e-5, rtol=0)
    assert torch.isfinite(batched).all()


def test_positions_past_the_window_are_refused():
    model = tiny(max_seq_len=16)
    with pytest.raises(ValueError, match="context window of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_cache_has_the_documented_shape_and_refuses_overflow():
    model = tiny(n_heads=4, n_kv_heads=2)
    cache = model.new_cache(batch_size=3, max_len=10)
    assert cache.k.shape == (2, 3, 2, 10, 8)  # (layers, batch, kv heads, max_len, head_dim)
    assert cache.nbytes == 2 * 2 * 3 * 2 * 10 * 8 * 4
    with pytest.raises(ValueError, match="holds 10 positions"):
        model(torch.zeros(3, 11, dtype=torch.long), cache=cache)


def test_tied_head_shares_the_embedding_and_untied_does_not():
    tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
    assert tied.head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()


def test_training_mode_dropout_changes_outputs_and_eval_is_deterministic():
    model = tiny(dropout=0.5)
    idx = torch.randint(0, 97, (1, 8))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_loss_backward_reaches_every_parameter():
    model = tiny(**VARIANTS["gpt2-style"]).train()
    idx = torch.randint(0, 97, (2, 16))
    logits = model(idx[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), idx[:, 1:].reshape(-1))
    loss.backward()
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5  # near-uniform at init
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
