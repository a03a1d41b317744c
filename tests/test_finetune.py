"""Fine-tuning: data formats to exact tokens and masks, the masked loss, LoRA, merge, resume,
errors."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from fixtures import corpus_text, instruction_records, write_instructions
from helpers_run import make_run, make_tokenizer
from safetensors.torch import load_file

from models import Transformer, get_preset
from models.lora import LoRALinear, apply_lora, merge_lora
from tformer_cli.data.examples import ExampleBatches, load_examples, to_example
from tformer_cli.data.tokenizer import load_tokenizer
from tformer_cli.runs.rundir import load_run
from tformer_cli.training.config import TrainConfig
from tformer_cli.training.finetune import FinetuneOptions, finetune
from tformer_cli.training.loss import IGNORE, lm_loss


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    text = corpus_text(60_000) + "".join(json.dumps(r) + "\n" for r in instruction_records(400))
    return make_tokenizer(text, tmp_path_factory.mktemp("ft") / "tok.model", vocab_size=600)


@pytest.fixture(scope="module")
def tok(tok_path):
    return load_tokenizer(tok_path)


@pytest.fixture(scope="module")
def base(tok_path, tmp_path_factory):
    """A briefly pretrained nano base (LoRA on a random base has little to build on)."""
    from tformer_cli.training.pretrain import train

    corpus = tok_path.with_suffix(".txt")  # the tokenizer's own training text
    out = tmp_path_factory.mktemp("ft") / "base"
    cfg = TrainConfig(
        preset="nano",
        model={"max_seq_len": 128},
        tokenizer=str(tok_path),
        batch_size=8,
        seq_len=128,
        max_steps=80,
        lr=3e-3,
        eval_every=1000,
        eval_batches=1,
        sample_every=0,
    )
    train(cfg, [corpus], out, tmp_path_factory.mktemp("cache"))
    return out


@pytest.fixture(scope="module")
def data400(tmp_path_factory):
    return write_instructions(tmp_path_factory.mktemp("ft") / "ins400.jsonl", 400)


# -- data formats -----------------------------------------------------------------------------


def test_each_format_gives_the_exact_tokens_and_mask(tok):
    m, enc = tok.marker_ids, tok.encode
    user, asst, end = m["<|user|>"], m["<|assistant|>"], m["<|end|>"]
    chat = to_example(
        tok,
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        "x",
    )
    assert chat.ids == [tok.bos_id, user, *enc("Hi"), end, asst, *enc("Yo"), end]
    assert chat.mask == [False] * (4 + len(enc("Hi"))) + [True] * (len(enc("Yo")) + 1)
    alpaca = to_example(tok, {"instruction": "Add", "input": "1 2", "output": "3"}, "x")
    assert alpaca.ids == [tok.bos_id, user, *enc("Add\n\n1 2"), end, asst, *enc("3"), end]
    assert sum(alpaca.mask) == len(enc("3")) + 1
    no_input = to_example(tok, {"instruction": "Add", "input": "", "output": "3"}, "x")
    assert (
        no_input.ids[2 : 2 + len(enc("Add"))] == enc("Add")
        and no_input.ids[2 + len(enc("Add"))] == end
    )
    pc = to_example(tok, {"prompt": "Q", "completion": "A"}, "x")
    assert pc.ids == [tok.bos_id, user, *enc("Q"), end, asst, *enc("A"), end]
    text = to_example(tok, {"text": "plain words"}, "x")
    assert text.ids == [tok.bos_id, *enc("plain words"), tok.eos_id] and text.mask == [False] + [
        True
    ] * (len(text.ids) - 1)
    everything = to_example(tok, {"prompt": "Q", "completion": "A"}, "x", train_on_prompt=True)
    assert everything.mask == [False] + [True] * (len(pc.ids) - 1)


def test_txt_json_array_and_jsonl_files(tok, tmp_path):
    (tmp_path / "a.txt").write_text("continued pretraining text")
    (tmp_path / "b.json").write_text(json.dumps([{"prompt": "Q", "completion": "A"}]))
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "t"}) + "\n\n" + json.dumps({"prompt": "P", "completion": "C"}) + "\n"
    )
    examples = load_examples([tmp_path / "a.txt", tmp_path / "b.json", tmp_path / "c.jsonl"], tok)
    assert len(examples) == 4


def test_batches_pad_and_mask(tok):
    ex = to_example(tok, {"prompt": "Q", "completion": "A"}, "x")
    x, y = ExampleBatches([ex], seq_len=20, pad_id=tok.pad_id, seed=0).batch(0, 1)
    n = len(ex.ids) - 1
    assert x[0, :n].tolist() == ex.ids[:-1] and (x[0, n:] == tok.pad_id).all()
    expected = [t if keep else IGNORE for t, keep in zip(ex.ids[1:], ex.mask[1:], strict=True)]
    assert y[0, :n].tolist() == expected and (y[0, n:] == IGNORE).all()
    long = to_example(tok, {"text": "word " * 100}, "x")
    batches = ExampleBatches([long], seq_len=16, pad_id=tok.pad_id, seed=0)
    assert batches.truncated == 1 and batches.batch(0, 1)[0].shape == (1, 16)


def test_loss_is_only_on_assistant_tokens(tok):
    torch.manual_seed(0)
    model = Transformer(get_preset("nano", vocab_size=tok.vocab_size, n_layers=1)).eval()
    ex = to_example(tok, {"prompt": "Question", "completion": "Answer"}, "x")
    x, y = ExampleBatches([ex], seq_len=32, pad_id=tok.pad_id, seed=0).batch(0, 1)
    with torch.no_grad():
        logits = model(x)[0]
        loss = lm_loss(model, x, y).item()
        logp = F.log_softmax(logits.float(), -1)
        picked = [-logp[t, ex.ids[t + 1]].item() for t in range(len(ex.ids) - 1) if ex.mask[t + 1]]
    assert math.isclose(loss, sum(picked) / len(picked), rel_tol=1e-5)
    assert len(picked) == len(tok.encode("Answer")) + 1


# -- LoRA ---------------------------------------------------------------------------------------


def test_lora_at_init_leaves_outputs_unchanged_and_trains_only_adapters():
    torch.manual_seed(0)
    model = Transformer(get_preset("nano", vocab_size=100)).eval()
    idx = torch.randint(0, 100, (2, 12))
    before = model(idx)
    names = apply_lora(model, ["q", "v", "mlp"], rank=4, alpha=8)
    assert len(names) == 4 * 5 and all(
        isinstance(model.get_submodule(n), LoRALinear) for n in names
    )
    assert torch.equal(model(idx), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)


def test_merge_equals_base_plus_adapter():
    torch.manual_seed(0)
    model = Transformer(get_preset("nano", vocab_size=100)).eval()
    apply_lora(model, ["q", "k", "v", "o"], rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.1)
    idx = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        with_adapter = model(idx)
        merged = merge_lora(model)(idx)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(with_adapter, merged, atol=1e-5)


def test_bad_lora_targets(base, data400, cli, tmp_path):
    res = cli("finetune", base, data400, "-o", tmp_path / "x", "--lora-targets", "q,gate")
    assert res.exit_code == 1 and "unknown LoRA target(s) gate" in res.stderr


# -- end to end --------------------------------------------------------------------------------


def _losses(run):
    return [
        json.loads(line)["loss"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]


@pytest.mark.parametrize("method", ["--lora", "--full"])
def test_lora_and_full_lower_the_loss_and_the_run_loads(method, base, data400, cli, tmp_path):
    out = tmp_path / method.strip("-")
    extra = (
        ["--lora-targets", "q,k,v,o,mlp", "--lr", "1e-2"]
        if method == "--lora"
        else ["--lr", "3e-3"]
    )
    res = cli(
        "finetune",
        base,
        data400,
        "-o",
        out,
        method,
        "--max-steps",
        "40",
        "--batch-size",
        "8",
        "--seq-len",
        "96",
        "--log-every",
        "5",
        "--eval-every",
        "20",
        "--quiet",
        "--json",
        *extra,
    )
    assert res.exit_code == 0, res.stderr
    card = json.loads(res.stdout)
    losses = _losses(out)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05  # the training loss falls
    config = json.loads((out / "config.json").read_text())
    assert config["chat"] is True and config["base"] == str(base.resolve())
    if method == "--lora":
        assert (out / "adapter.safetensors").is_file() and not (out / "model.safetensors").exists()
        assert (out / "adapter.safetensors").stat().st_size < 0.15 * (
            base / "model.safetensors"
        ).stat().st_size
        assert card["trainable_params"] < 0.15 * card["params"]
    else:
        assert (out / "model.safetensors").is_file() and card["trainable_params"] == card["params"]
    chat = cli("chat", "-m", out, "-n", "8", "--seed", "0", stdin="Hello\nWho are you?\n")
    assert chat.exit_code == 0 and "chat markers" in chat.stderr
    gen = cli("generate", "-m", out, "-p", "Hi", "-n", "5", "--temperature", "0")
    assert gen.exit_code == 0


def test_merge_writes_a_standalone_model_with_the_same_outputs(base, data400, tmp_path):
    cfg = TrainConfig(
        max_steps=6, batch_size=4, seq_len=64, lr=3e-3, eval_every=100, eval_batches=1
    )
    card = finetune(cfg, FinetuneOptions(merge=True), base, [data400], tmp_path / "m")
    assert card["merged"]
    merged = load_file(tmp_path / "m" / "model.safetensors")
    adapter = load_file(tmp_path / "m" / "adapter.safetensors")
    assert "layers.0.attn.wq.weight" in merged and all(
        k.endswith(("lora_a", "lora_b")) for k in adapter
    )
    (tmp_path / "m" / "model.safetensors").rename(
        tmp_path / "m" / "merged.bak"
    )  # base + adapter path
    idx = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        via_adapter = load_run(tmp_path / "m").model(idx)
    (tmp_path / "m" / "merged.bak").rename(tmp_path / "m" / "model.safetensors")
    with torch.no_grad():
        standalone = load_run(tmp_path / "m").model(idx)
    assert torch.allclose(via_adapter, standalone, atol=1e-5)


def test_interrupt_and_resume_is_exact(base, data400, tmp_path):
    cfg = dict(
        max_steps=12,
        batch_size=4,
        seq_len=64,
        lr=3e-3,
        eval_every=5,
        eval_batches=1,
        save_every=100,
    )
    finetune(TrainConfig(**cfg), FinetuneOptions(dropout=0.1), base, [data400], tmp_path / "a")
    stop = threading.Event()

    def on_event(kind, data):
        if kind in ("step", "tick") and data["step"] == 7:
            stop.set()

    card = finetune(
        TrainConfig(**cfg),
        FinetuneOptions(dropout=0.1),
        base,
        [data400],
        tmp_path / "b",
        on_event=on_event,
        stop=stop,
    )
    assert card["interrupted"] and card["steps"] == 7
    finetune(
        TrainConfig(**cfg),
        FinetuneOptions(dropout=0.1),
        base,
        [data400],
        tmp_path / "b",
        resume=True,
    )
    a, b = (
        load_file(tmp_path / "a" / "adapter.safetensors"),
        load_file(tmp_path / "b" / "adapter.safetensors"),
    )
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


# -- errors -------------------------------------------------------------------------------------


def test_broken_line_401_is_named(base, data400, cli, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(data400.read_text() + '{"instruction": "x", "output": \n')
    res = cli("finetune", base, broken, "-o", tmp_path / "x")
    assert (
        res.exit_code == 1
        and "broken.jsonl:401" in res.stderr
        and "line 401 is not valid JSON" in res.stderr
    )


def test_messages_format_file_works(base, cli, tmp_path):
    data = tmp_path / "chat.jsonl"
    conv = {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    }
    data.write_text((json.dumps(conv) + "\n") * 20)
    res = cli(
        "finetune",
        base,
        data,
        "-o",
        tmp_path / "c",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--quiet",
    )
    assert res.exit_code == 0, res.stderr


@pytest.mark.parametrize(
    "line, message",
    [
        ({"instruction": "x", "output": "y", "extra": 1}, "unknown field(s) extra"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
        ({"question": "x"}, "unknown record with fields question"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message"),
    ],
)
def test_bad_records_name_their_line(line, message, base, cli, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(line) + "\n")
    res = cli("finetune", base, data, "-o", tmp_path / "x")
    assert res.exit_code == 1 and "d.jsonl:2" in res.stderr and message in res.stderr


def test_empty_data_missing_base_and_other_base_on_resume(base, tok_path, data400, cli, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    res = cli("finetune", base, empty, "-o", tmp_path / "x")
    assert res.exit_code == 1 and "empty" in res.stderr
    res = cli("finetune", tmp_path / "nobase", data400, "-o", tmp_path / "x")
    assert res.exit_code == 1 and "no such run directory" in res.stderr
    out = tmp_path / "r"
    assert (
        cli(
            "finetune",
            base,
            data400,
            "-o",
            out,
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "-q",
        ).exit_code
        == 0
    )
    other = make_run(tmp_path / "other", tok_path, seed=9, max_seq_len=128)
    res = cli("finetune", other, data400, "-o", out, "--max-steps", "4", "--resume", "-q")
    assert res.exit_code == 1 and "another base" in res.stderr
