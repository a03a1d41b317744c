"""Quantized and packed weights for inference: int8 quality on a trained model, the fused step
against the plain forward, packed bf16, `--quantize` on the commands and its errors."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from fixtures import corpus_text, write_corpus
from helpers_run import shared_tokenizer

from models import Transformer, get_preset, save_model
from models.quantize import Bf16Linear, Int8Linear, packed_bf16_available, quantize_model
from tformer_cli.data.tokenizer import load_tokenizer
from tformer_cli.device import PACKED_BF16_MIN_PARAMS, cpu_has_fast_bf16
from tformer_cli.errors import TformerError
from tformer_cli.inference.load import check_quantize, load_for_inference, model_precision
from tformer_cli.inference.sampling import SamplingConfig
from tformer_cli.inference.text import generate
from tformer_cli.runs.rundir import read_model_config

GREEDY = SamplingConfig(temperature=0)
CPU = torch.device("cpu")
PROMPTS = ("The", "If the", "A class", "def")
CORPUS_CHARS = 100_000
T = 64
VAL_FRACTION = 0.1


def _windows(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive (x, y) windows of T tokens over a token stream."""
    n = (len(tokens) - 1) // T
    return tokens[: n * T].view(n, T), tokens[1 : n * T + 1].view(n, T)


def _loss(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A nano model trained on the fixture corpus until its validation loss is well below a
    uniform guess (0.7 ln V), saved as a run whose config.json records the corpus as training
    does (so profile finds the held-out text). Returns (run dir, validation windows)."""
    directory = tmp_path_factory.mktemp("quantize")
    tok_path = shared_tokenizer(400)
    tok = load_tokenizer(tok_path)
    corpus = write_corpus(directory / "corpus.txt", CORPUS_CHARS)
    text = corpus_text(CORPUS_CHARS)
    cut = int(len(text.encode("utf-8")) * (1 - VAL_FRACTION))
    train = torch.tensor(tok.encode(text.encode("utf-8")[:cut].decode("utf-8", "ignore")))
    val_x, val_y = _windows(torch.tensor(tok.encode(text.encode("utf-8")[cut:].decode())))
    torch.manual_seed(0)
    net = Transformer(get_preset("nano", vocab_size=tok.vocab_size, max_seq_len=T))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains as fast on one, and a busy CPU stalls two
    try:
        _train(net, train, val_x, val_y, 0.7 * math.log(tok.vocab_size))
    finally:
        torch.set_num_threads(threads)
    run = directory / "run"
    files = [{"path": str(corpus.resolve()), "bytes": corpus.stat().st_size}]
    save_model(net, run, extra={"data": {"files": files, "val_fraction": VAL_FRACTION}})
    shutil.copyfile(tok_path, run / "tokenizer.model")
    return run, val_x, val_y


def _train(net: Transformer, train: torch.Tensor, val_x, val_y, target: float) -> None:
    """AdamW on random windows until the validation loss is below target (400 steps at most)."""
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 401):
        starts = torch.randint(0, len(train) - T - 1, (16,), generator=gen)
        x = torch.stack([train[s : s + T] for s in starts])
        y = torch.stack([train[s + 1 : s + T + 1] for s in starts])
        loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 and _loss(net.eval(), val_x, val_y) < target:
            break
        net.train()
    net.eval()
    assert _loss(net, val_x, val_y) < target, "the test model did not learn"


# -- quality on a trained model ----------------------------------------------------------------


def test_int8_changes_the_validation_loss_by_less_than_one_percent(trained):
    run, x, y = trained
    fp32 = load_for_inference(run, CPU, "fp32").model
    int8 = load_for_inference(run, CPU, "fp32", quantize="int8").model
    before, after = _loss(fp32, x, y), _loss(int8, x, y)
    assert before < 0.7 * math.log(fp32.config.vocab_size)
    assert abs(after - before) / before < 0.01


def test_int8_greedy_tokens_equal_fp32_on_a_trained_model(trained):
    run = trained[0]
    fp32 = load_for_inference(run, CPU, "fp32")
    int8 = load_for_inference(run, CPU, "fp32", quantize="int8")
    tok = fp32.tokenizer
    for prompt in PROMPTS:
        ids = [tok.bos_id, *tok.encode(prompt)]
        (a,), _ = generate(fp32.model, tok, [ids], GREEDY, 16, eos_ids=())
        (b,), _ = generate(int8.model, tok, [ids], GREEDY, 16, eos_ids=())
        assert len(a.ids) == 16 and a.ids == b.ids, prompt


def test_quantized_layers_replace_every_linear_and_keep_the_rest_float(trained):
    model = load_for_inference(trained[0], CPU, "fp32", quantize="int8").model
    assert type(model.head) is Int8Linear and model.fused_decoding
    assert all(type(m) is not torch.nn.Linear for m in model.modules())
    assert model.tok_emb.weight.dtype == torch.float32  # the tied embedding stays float
    assert not any(k.endswith(("wq.weight", "head.weight")) for k in model.state_dict())


def test_quantized_weights_are_never_written(trained, cli):
    run = trained[0]
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir()}
    result = cli("generate", "-m", run, "-p", "The", "-n", "8", "--quantize", "int8", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["quantize"] == "int8" and data["precision"] == "fp32" and data["new_tokens"]
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir()}
    assert after == before


# -- the fused step on packed weights ----------------------------------------------------------

VARIANTS = {
    "llama": {},
    "gpt": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "gqa": dict(n_kv_heads=2),
    "untied": dict(tie_embeddings=False),
}


def _packed_model(variant: str, scheme: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(get_preset("nano", vocab_size=300, max_seq_len=32, **VARIANTS[variant]))
    return quantize_model(model.eval(), scheme).prepare_for_inference()


def _padded_batch_steps(model: Transformer, fused: bool) -> list[torch.Tensor]:
    """Logits of two decoding steps after a left-padded prefill of 8 rows."""
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 300, (8, 10), generator=gen)
    pads = torch.arange(8) % 4
    pos = (torch.arange(10)[None] - pads[:, None]).clamp(min=0)
    key_mask = torch.arange(32)[None] >= pads[:, None]
    out = []
    with torch.inference_mode():
        cache = model.new_cache(8)
        model.hidden(idx, cache=cache, pos=pos, key_mask=key_mask)
        for n, tok in enumerate(torch.randint(0, 300, (2, 8), generator=gen)):
            slot = 10 + n
            where = dict(pos=(slot - pads)[:, None], key_mask=key_mask)
            out.append(model.last_logits(tok[:, None], cache, slot, fused=fused, **where))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_fused_step_equals_the_plain_forward_on_a_batch_of_8(variant):
    model = _packed_model(variant, "int8")
    assert model.fused_decoding and type(model.layers[0].attn.wq) is Int8Linear
    for got, want in zip(
        _padded_batch_steps(model, True), _padded_batch_steps(model, False), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


needs_bf16 = pytest.mark.skipif(
    not (cpu_has_fast_bf16() and packed_bf16_available()),
    reason="the packed bf16 path runs where the CPU has bf16 hardware (AVX512-BF16/AMX) and "
    "torch has oneDNN's packed linear; this machine has not",
)


@needs_bf16
@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_bf16_is_close_to_fp32_and_fused_equals_unfused(variant):
    torch.manual_seed(0)
    ref = Transformer(get_preset("nano", vocab_size=300, max_seq_len=32, **VARIANTS[variant]))
    model = _packed_model(variant, "bf16")
    assert model.fused_decoding and type(model.head) is Bf16Linear
    assert model.new_cache(1).k.dtype == torch.bfloat16
    fused, plain = _padded_batch_steps(model, True), _padded_batch_steps(model, False)
    reference = _padded_batch_steps(ref.eval().prepare_for_inference(), True)
    for got, unfused, want in zip(fused, plain, reference, strict=True):
        torch.testing.assert_close(got, unfused, atol=1e-5, rtol=1e-5)
        assert got.dtype == torch.float32
        assert (got - want).abs().max() <= 0.02 * want.abs().max()


@needs_bf16
def test_bf16_on_a_cpu_with_bf16_hardware_loads_packed(trained):
    model = load_for_inference(trained[0], CPU, "bf16").model
    assert type(model.layers[0].mlp.w1) is Bf16Linear and model.fused_decoding


def test_fp32_is_not_packed(trained):
    model = load_for_inference(trained[0], CPU, "fp32").model
    assert type(model.head) is torch.nn.Linear and model.fused_decoding


def test_auto_keeps_small_models_fp32_and_packs_large_ones_where_bf16_pays(trained, monkeypatch):
    """--precision auto for inference is bf16 only where packed bf16 is faster: a CPU with bf16
    hardware and a model of PACKED_BF16_MIN_PARAMS or more; explicit flags are kept."""
    small = trained[0]
    assert model_precision("auto", CPU, "fp32", small) == "fp32"
    assert model_precision("bf16", CPU, "bf16", small) == "bf16"  # asked for: kept
    monkeypatch.setattr("tformer_cli.device.auto_precision", lambda device, job: ("bf16", ""))
    assert model_precision("auto", CPU, "bf16", small) == "fp32"  # too small to pay
    large = read_model_config(small).replace(dim=512, n_layers=2, hidden_dim=4096)
    assert large.num_params() >= PACKED_BF16_MIN_PARAMS
    monkeypatch.setattr("tformer_cli.inference.load.read_model_config", lambda path: large)
    assert model_precision("auto", CPU, "bf16", small) == "bf16"


# -- the commands ------------------------------------------------------------------------------


def test_profile_quantize_reports_bytes_speed_and_quality(trained, cli):
    run = trained[0]
    result = cli("profile", "-m", run, "--quantize", "int8", "--quick", "-T", "64", "--json", "-")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    q = data["quantization"]
    assert data["quantize"] == "int8" and data["precision"] == "fp32" and q["scheme"] == "int8"
    assert q["weight_bytes_per_token"] < 0.3 * q["fp32_weight_bytes_per_token"]
    assert q["decode_tokens_per_s"] > 0 and q["fp32_decode_tokens_per_s"] > 0
    quality = q["quality"]
    assert quality["text"] == "held-out text of the run (corpus.txt)" and quality["tokens"] > 0
    assert abs(quality["loss_change"]) < 0.01 and quality["top1_agreement"] > 0.9
    assert 0 <= quality["kl_nats_per_token"] < 0.05
    assert quality["loss_fp32"] < 0.8 * quality["uniform_loss"]  # other windows than the fixture


def test_profile_of_a_preset_measures_quality_on_random_tokens(cli):
    args = ("profile", "--preset", "nano", "--quantize", "int8", "--no-measure", "--json", "-")
    data = json.loads(cli(*args).stdout)
    assert data["quantization"]["quality"] is None  # a measurement: not with --no-measure
    assert data["quantization"]["bytes_ratio"] < 0.3


@pytest.mark.parametrize(
    "args, message",
    [
        (("generate", "-p", "x", "--quantize", "nope"), "--quantize 'nope': choose one of none"),
        (("chat", "--quantize", "int4"), "--quantize 'int4': choose one of none, int8"),
        (("profile", "--quantize", "nope"), "--quantize 'nope'"),
        (
            ("generate", "-p", "x", "--quantize", "int8", "--precision", "bf16"),
            "drop --precision bf16",
        ),
        (("generate", "-p", "x", "--quantize", "int8", "--compile"), "does not combine"),
        (("train", "corpus.txt", "--quantize", "int8"), "is for inference, not training"),
        (("finetune", "base", "data.jsonl", "-o", "out", "--quantize", "int8"), "inference"),
    ],
)
def test_quantize_errors_are_one_line(cli, trained, args, message):
    result = cli(*args, *(("-m", trained[0]) if args[0] in ("generate", "chat") else ()))
    assert result.exit_code != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_quantize_on_a_gpu_says_which_device_and_what_works():
    with pytest.raises(TformerError) as e:
        check_quantize("int8", torch.device("cuda"))
    assert "CPU only, not on cuda" in str(e.value) and "--precision bf16" in str(e.value)
    assert check_quantize("none", torch.device("cuda")) == "none"
