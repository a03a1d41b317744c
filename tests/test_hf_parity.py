"""Reference parity: the same weights in transformers' Llama and GPT-2 give the same logits."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, Transformer
from models.hf import gpt2_config, hf_architecture, llama_config, to_gpt2_state, to_llama_state

transformers = pytest.importorskip(
    "transformers", reason="transformers is in the dev extra: pip install -e '.[dev]'"
)


def _hf_model(cls_name: str, config_cls_name: str, config: dict, state: dict) -> torch.nn.Module:
    hf_config = getattr(transformers, config_cls_name)(**config)
    hf = getattr(transformers, cls_name)(hf_config).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected
    assert all("rotary" in k or "attn.bias" in k or "masked_bias" in k for k in missing), missing
    return hf


@pytest.mark.parametrize("kv_heads, tied", [(4, True), (2, False), (1, True)])
def test_llama_style_model_matches_llama_for_causal_lm(kv_heads, tied):
    cfg = ModelConfig(
        vocab_size=101,
        dim=64,
        n_layers=3,
        n_heads=4,
        n_kv_heads=kv_heads,
        hidden_dim=96,
        max_seq_len=64,
        rope_theta=500.0,
        norm_eps=1e-6,
        tie_embeddings=tied,
    )
    assert hf_architecture(cfg) == "LlamaForCausalLM"
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains so the norm weights are really compared
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf_cfg = {
        k: v for k, v in llama_config(cfg).items() if k not in ("architectures", "model_type")
    }
    hf = _hf_model(
        "LlamaForCausalLM", "LlamaConfig", hf_cfg, to_llama_state(model.state_dict(), cfg)
    )
    idx = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_gpt2_style_model_matches_gpt2_lm_head_model():
    cfg = ModelConfig(
        vocab_size=101,
        dim=64,
        n_layers=2,
        n_heads=4,
        hidden_dim=256,
        max_seq_len=64,
        norm="layernorm",
        pos="learned",
        mlp="gelu",
        bias=True,
        tie_embeddings=True,
    )
    assert hf_architecture(cfg) == "GPT2LMHeadModel"
    model = Transformer(cfg).eval()
    with torch.no_grad():  # biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    hf_cfg = {k: v for k, v in gpt2_config(cfg).items() if k not in ("architectures", "model_type")}
    hf = _hf_model("GPT2LMHeadModel", "GPT2Config", hf_cfg, to_gpt2_state(model.state_dict(), cfg))
    idx = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
