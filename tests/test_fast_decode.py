"""The fast fp32 decoding path computes what the plain model computes: greedy output is the same
token for token, eager or compiled."""

from __future__ import annotations

import pytest
import torch

import models.transformer
from models import Transformer, get_preset
from tformer_cli.inference.sampling import SamplingConfig
from tformer_cli.inference.text import generate

GREEDY = SamplingConfig(temperature=0)
VARIANTS = {
    "llama": {},
    "gpt": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "gqa": dict(n_kv_heads=2),
}


class Ids:
    """The engine's view of a tokenizer: ids only, nothing ends a row."""

    bos_id, eos_id, marker_ids, vocab_size = 1, -1, {}, 1 << 30

    def decode(self, ids: list[int]) -> str:
        return ""


def _pair(variant: str) -> tuple[Transformer, Transformer]:
    """A model prepared for fast decoding and an untouched copy of it."""
    torch.manual_seed(0)
    plain = Transformer(get_preset("nano", vocab_size=300, **VARIANTS[variant])).eval()
    fast = Transformer(plain.config)
    fast.load_state_dict(plain.state_dict())
    return fast.prepare_for_inference(), plain


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_greedy_tokens_equal_the_plain_forward_pass(variant):
    fast, plain = _pair(variant)
    assert fast.fused_decoding
    prompt = [1, 17, 42, 99]
    (out,), _ = generate(fast, Ids(), [prompt], GREEDY, 40, eos_ids=())
    seq = torch.tensor([prompt + out.ids])
    with torch.no_grad():
        expected = plain(seq)[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert out.ids == expected


def test_the_compiled_step_equals_the_eager_one(monkeypatch):
    # compile=True compiles the one-token step on GPUs only; here it is made to on the CPU,
    # so the code path a GPU takes is traced and checked
    monkeypatch.setattr(models.transformer, "COMPILE_STEP", ("cpu",))
    eager, _ = _pair("llama")
    torch.manual_seed(0)
    compiled = Transformer(eager.config)
    compiled.load_state_dict(eager.state_dict())
    compiled.prepare_for_inference(compile=True)
    assert compiled._compiled_step is not None
    (got,), _ = generate(compiled, Ids(), [[1, 5, 9]], GREEDY, 8, eos_ids=())
    (want,), _ = generate(eager, Ids(), [[1, 5, 9]], GREEDY, 8, eos_ids=())
    assert got.ids == want.ids
