"""The fast training step computes the model it always did: each attention path gives the math
reference's loss, the stacked bf16 matmuls give the layer-by-layer loss and gradients, the bf16
weight copies follow the fp32 masters, and a run keeps the attention it recorded."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import write_corpus

from models import ModelConfig, Transformer
from models import fused as fused_module
from models.attention import training_attention
from models.fused import release_weight_copies
from models.layers import dropout
from tformer_cli.training.config import TrainConfig
from tformer_cli.training.loss import lm_loss
from tformer_cli.training.optim import build_optimizer
from tformer_cli.training.pretrain import train

GPT = dict(norm="layernorm", pos="learned", mlp="gelu", bias=True)  # the original flavour
SHAPES = {
    "llama": dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=32),
    "gqa": dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32),
    "gpt": dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=32, **GPT),
}
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}  # relative, on the loss


def _model(shape: str, **changes) -> tuple[Transformer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**SHAPES[shape], **changes})).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (3, 32), generator=gen)
    return model, x, torch.roll(x, -1, dims=1)


def _loss_and_grads(model, x, y, precision: str) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = lm_loss(model, x, y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_attention_path_gives_the_math_reference_loss(shape, precision):
    model, x, y = _model(shape)
    model.set_attention("math")
    reference, _ = _loss_and_grads(model, x, y, precision)
    model.set_attention("sdpa")
    loss, _ = _loss_and_grads(model, x, y, precision)
    assert loss == pytest.approx(reference, rel=TOLERANCE[precision])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_stacked_bf16_matmuls_give_the_layer_by_layer_loss_and_gradients(shape, monkeypatch):
    model, x, y = _model(shape)
    loss, grads = _loss_and_grads(model, x, y, "bf16")
    assert model.layers[0].attn.__dict__.get("_weight_copies")  # the stacked path ran
    monkeypatch.setattr(fused_module, "fusable", lambda layers: False)
    release_weight_copies(model)
    ref_loss, ref_grads = _loss_and_grads(model, x, y, "bf16")
    assert not model.layers[0].attn.__dict__.get("_weight_copies")
    assert loss == pytest.approx(ref_loss, rel=TOLERANCE["bf16"])
    for name, ref in ref_grads.items():
        assert grads[name].dtype == torch.float32  # the masters' gradients stay fp32
        scale = ref.abs().max().clamp(min=1e-3)  # key biases get ~0 gradient: absolute there
        assert (grads[name] - ref).abs().max() <= 0.05 * scale, name


def test_fp32_training_runs_the_layers_as_they_are():
    model, x, y = _model("llama")
    _loss_and_grads(model, x, y, "fp32")
    assert not any(m.__dict__.get("_weight_copies") for m in model.modules())


def test_bf16_weight_copies_are_made_once_per_step_and_follow_the_update():
    model, x, y = _model("llama")
    opt = build_optimizer(model, 1e-2, 0.0, torch.device("cpu"))
    opt.register_step_post_hook(lambda *_: release_weight_copies(model))
    attn = model.layers[0].attn

    def stacked_qkv() -> torch.Tensor:
        return next(w for key, (_, w, _) in attn._weight_copies.items() if len(key) == 4)

    _loss_and_grads(model, x, y, "bf16")
    first = stacked_qkv()
    _loss_and_grads(model, x, y, "bf16")  # a second micro-batch of the same step
    assert stacked_qkv() is first
    opt.step()
    assert "_weight_copies" not in attn.__dict__
    _loss_and_grads(model, x, y, "bf16")
    masters = torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight])
    assert torch.equal(stacked_qkv(), masters.detach().to(torch.bfloat16))
    assert not torch.equal(stacked_qkv(), first)
    with torch.no_grad():  # an edit in place outside the optimizer is seen too
        attn.wq.weight.mul_(2)
    _loss_and_grads(model, x, y, "bf16")
    assert torch.equal(stacked_qkv()[: attn.wq.out_features], attn.wq.weight.detach().bfloat16())


def test_dropout_keeps_one_minus_p_scaled_and_p_zero_draws_nothing():
    x = torch.ones(200_000)
    torch.manual_seed(0)
    y = dropout(x, 0.2)
    assert set(y.unique().tolist()) == {0.0, 1.25}
    assert (y == 0).float().mean().item() == pytest.approx(0.2, abs=0.005)
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.2), y)  # a function of the RNG state: resume replays it
    torch.manual_seed(0)
    assert dropout(x, 0.0) is x and dropout(x, 0.2, training=False) is x
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)  # no random numbers drawn


def test_the_attention_rule():
    assert training_attention("cpu", 0.0) == "sdpa"
    assert training_attention("cpu", 0.2) == "math"
    assert training_attention("cuda", 0.2) == "sdpa"


def test_a_run_records_its_attention_and_resume_keeps_it(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 40_000)
    cfg = dict(
        preset="nano",
        vocab_size=512,
        batch_size=2,
        seq_len=32,
        max_steps=4,
        eval_every=2,
        eval_batches=1,
        save_every=2,
        sample_every=0,
        dropout=0.1,
    )
    run, cache = tmp_path / "run", tmp_path / "cache"
    card = train(TrainConfig(**cfg), [corpus], run, cache)
    state_file = run / "train_state" / "state.json"
    assert card["attention"] == "math"
    assert json.loads(state_file.read_text())["run"]["attention"] == "math"
    # A run recorded with the other implementation resumes with it, whatever the rule says now.
    state = json.loads(state_file.read_text())
    state["run"]["attention"] = "sdpa"
    state_file.write_text(json.dumps(state))
    card = train(TrainConfig(**{**cfg, "max_steps": 6}), [corpus], run, cache, resume=True)
    assert card["attention"] == "sdpa" and card["steps"] == 6
