"""`tformer import`: local Hugging Face Llama checkpoints become tformer runs, exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece as spm
import torch
from fixtures import write_corpus
from helpers_run import make_run, shared_tokenizer

from tformer_cli.interop.hf_export import export_hf
from tformer_cli.interop.hf_import import import_hf
from tformer_cli.runs.rundir import load_run_model

transformers = pytest.importorskip(
    "transformers", reason="the hf extra is not installed: pip install -e '.[hf]'"
)


def _one_line_error(res, *parts):
    assert res.exit_code != 0
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    for part in parts:
        assert part in res.stderr, res.stderr


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    """A sentencepiece model like a Llama one: byte fallback, no pad, no tformer chat markers."""
    directory = tmp_path_factory.mktemp("plain")
    corpus = write_corpus(directory / "c.txt", 50_000)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    return directory / "tokenizer.model"


def _random_llama(directory, tokenizer, vocab_size, **overrides):
    """A randomly initialised LlamaForCausalLM saved by transformers, with a sentencepiece
    tokenizer."""
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rope_theta=500.0,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **overrides})).eval()
    with torch.no_grad():  # non-trivial norm gains so they are really compared
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(directory)
    shutil.copyfile(tokenizer, directory / "tokenizer.model")
    return hf


@pytest.mark.parametrize("model", [{}, {"tie_embeddings": False, "n_kv_heads": 2}])
def test_import_of_export_round_trips_the_weights_exactly(model, tmp_path):
    run = make_run(tmp_path / "run", **model)
    export_hf(run, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    before, _ = load_run_model(run)
    after, info = load_run_model(tmp_path / "back")
    assert after.config == before.config
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == (
        run / "tokenizer.model"
    ).read_bytes()
    assert info["imported_from"] == str((tmp_path / "hf").resolve())


def test_random_llama_saved_by_transformers_gives_the_same_logits(cli, tmp_path):
    hf = _random_llama(tmp_path / "hf", shared_tokenizer(), 512)
    res = cli("import", tmp_path / "hf", "-o", tmp_path / "run")
    assert res.exit_code == 0, res.stderr
    assert "float32" in res.stdout
    model, _ = load_run_model(tmp_path / "run")
    assert (model.config.n_kv_heads, model.config.rope_theta, model.config.tie_embeddings) == (
        2,
        500.0,
        False,
    )
    idx = torch.randint(0, 512, (2, 50))
    with torch.no_grad():
        assert (model.eval()(idx) - hf(idx).logits).abs().max().item() < 1e-4


def test_sharded_bf16_checkpoint_imports(tmp_path):
    hf = _random_llama(tmp_path / "src", shared_tokenizer(), 512, tie_word_embeddings=True)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    shutil.copyfile(shared_tokenizer(), tmp_path / "hf" / "tokenizer.model")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    result = import_hf(tmp_path / "hf", tmp_path / "run")
    assert result.source_dtype == "bfloat16"
    model, _ = load_run_model(tmp_path / "run")
    assert model.config.tie_embeddings and model.tok_emb.weight.dtype == torch.float32
    assert torch.equal(model.tok_emb.weight, hf.model.embed_tokens.weight.float())


def test_imported_model_without_chat_markers_generates_chats_and_finetunes_on_text(
    plain_tokenizer, cli, tmp_path
):
    _random_llama(tmp_path / "hf", plain_tokenizer, 400)
    res = cli("import", tmp_path / "hf", "-o", tmp_path / "run")
    assert res.exit_code == 0 and "no tformer chat markers" in res.stdout, res.stderr
    run = tmp_path / "run"
    gen = cli("generate", "-m", run, "-p", "KING:", "-n", "5", "--temperature", "0", "--json")
    assert gen.exit_code == 0 and json.loads(gen.stdout)["new_tokens"] > 0, gen.stderr
    chat = cli("chat", "-m", run, "-n", "5", stdin="Hello\n")
    assert chat.exit_code == 0, chat.stderr

    text = tmp_path / "t.jsonl"
    text.write_text(
        "\n".join(json.dumps({"text": f"To be or not to be, {i}."}) for i in range(12)) + "\n"
    )
    res = cli("finetune", run, text, "-o", tmp_path / "ft", "--max-steps", "2", "--quiet")
    assert res.exit_code == 0, (
        res.stderr
    )  # no pad id in a Llama tokenizer: padding uses EOS (masked)
    chat_data = tmp_path / "c.jsonl"
    chat_data.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
    _one_line_error(
        cli("finetune", run, chat_data, "-o", tmp_path / "ft2"),
        "c.jsonl:1",
        "chat markers",
        "text data",
    )


def test_import_errors(cli, tmp_path, plain_tokenizer):
    _one_line_error(cli("import", tmp_path / "nope", "-o", tmp_path / "r"), "no such directory")

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    _one_line_error(
        cli("import", gpt2, "-o", tmp_path / "r"), "unsupported architecture 'gpt2'", "llama"
    )

    _random_llama(tmp_path / "hf", plain_tokenizer, 400)
    (tmp_path / "hf" / "tokenizer.model").rename(tmp_path / "hf" / "tokenizer.json")
    _one_line_error(
        cli("import", tmp_path / "hf", "-o", tmp_path / "r"),
        "no sentencepiece tokenizer.model",
        "tokenizer.json",
    )
    (tmp_path / "hf" / "tokenizer.json").rename(tmp_path / "hf" / "tokenizer.model")

    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    _one_line_error(
        cli("import", tmp_path / "hf", "-o", tmp_path / "r"), "never unpickles", "safetensors"
    )
    (tmp_path / "hf" / "pytorch_model.bin").rename(tmp_path / "hf" / "model.safetensors")

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    _one_line_error(
        cli("import", tmp_path / "hf", "-o", tmp_path / "taken"), "not empty", "--overwrite"
    )
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"

    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    _one_line_error(
        cli("import", tmp_path / "hf", "-o", tmp_path / "r2"), "'yarn'", "not supported"
    )
