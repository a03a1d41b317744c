"""`tformer export`: Hugging Face directories transformers loads, GGUF files gguf reads back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers_run import make_run

from models.llamacpp import rope_halves_to_pairs, rope_pairs_to_halves
from tformer_cli.data.tokenizer import load_tokenizer
from tformer_cli.runs.rundir import load_run_model

PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A briefly trained nano run (Llama-style, tied embeddings)."""
    return make_run(tmp_path_factory.mktemp("run") / "nano", train_steps=30)


def _one_line_error(res, *parts):
    assert res.exit_code != 0
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    for part in parts:
        assert part in res.stderr, res.stderr


def test_rope_permutation_is_inverted_exactly():
    w = torch.randn(2 * 24, 96)
    assert torch.equal(rope_pairs_to_halves(rope_halves_to_pairs(w, 2), 2), w)
    assert not torch.equal(rope_halves_to_pairs(w, 2), w)


# --- Hugging Face ---------------------------------------------------------------------------


def _transformers():
    return pytest.importorskip(
        "transformers", reason="the hf extra is not installed: pip install -e '.[hf]'"
    )


def test_hf_export_greedy_continuation_equals_tformer_generate(run, cli, tmp_path):
    transformers = _transformers()
    out = tmp_path / "hf"
    res = cli("export", run, "--format", "hf", "-o", out)
    assert res.exit_code == 0, res.stderr
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.model",
        "tokenizer_config.json",
    }
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    ours = cli(
        "generate",
        "-m",
        run,
        "-p",
        PROMPT,
        "-n",
        "40",
        "--temperature",
        "0",
        "--precision",
        "fp32",
        "--json",
    )
    assert ours.exit_code == 0, ours.stderr
    ours = json.loads(ours.stdout)

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    tok = load_tokenizer(run / "tokenizer.model")
    ids = hf_tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == [tok.bos_id, *tok.encode(PROMPT)]
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1] :].tolist()
    while new and new[-1] in (tok.eos_id, tok.marker_ids["<|end|>"]):
        new.pop()
    assert ours["new_tokens"] >= len(new) and len(new) > 0
    assert tok.decode(new) == ours["text"]


@pytest.mark.parametrize(
    "text",
    ["plain words", "  two  spaces\nand lines\n\n", "digits 2024", "<|user|>hi<|end|>", "Ünï ☃"],
)
def test_hf_tokenizer_gives_our_ids(run, text, tmp_path):
    transformers = _transformers()
    from tformer_cli.interop.hf_export import export_hf

    export_hf(run, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok = load_tokenizer(run / "tokenizer.model")
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_chat_run_exports_its_chat_template(tmp_path):
    transformers = _transformers()
    from tformer_cli.data.chat_template import encode_chat
    from tformer_cli.interop.hf_export import export_hf

    run = make_run(tmp_path / "chat", chat=True)
    export_hf(run, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert list(hf_ids) == encode_chat(load_tokenizer(run / "tokenizer.model"), messages)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 7]  # EOS and <|end|>


def test_gpt2_style_run_exports_as_gpt2_with_the_same_logits(tmp_path):
    transformers = _transformers()
    from tformer_cli.interop.hf_export import export_hf

    run = make_run(tmp_path / "g", norm="layernorm", pos="learned", mlp="gelu", bias=True)
    with torch.no_grad():  # biases start at zero: make them count
        model, _ = load_run_model(run)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    from models import save_model

    save_model(model, run)
    result = export_hf(run, tmp_path / "hf")
    assert result.architecture == "GPT2LMHeadModel"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 500, (2, 30))
    with torch.no_grad():
        assert (hf(idx).logits - model.eval()(idx)).abs().max().item() < 1e-4


def test_lora_run_exports_merged(run, tmp_path, cli):
    transformers = _transformers()
    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": f"Say {i}", "completion": f"{i} {i}"}) for i in range(20))
        + "\n"
    )
    res = cli(
        "finetune",
        run,
        data,
        "-o",
        tmp_path / "lora",
        "--max-steps",
        "3",
        "--lr",
        "1e-2",
        "--quiet",
    )
    assert res.exit_code == 0, res.stderr
    assert not (tmp_path / "lora" / "model.safetensors").exists()
    res = cli("export", tmp_path / "lora", "--format", "hf", "-o", tmp_path / "hf")
    assert res.exit_code == 0 and "merged" in res.stdout, res.stderr
    merged, _ = load_run_model(tmp_path / "lora")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 500, (1, 20))
    with torch.no_grad():
        assert (hf(idx).logits - merged.eval()(idx)).abs().max().item() < 1e-4


def test_hf_export_errors(run, cli, tmp_path):
    odd = make_run(
        tmp_path / "odd", pos="learned"
    )  # rmsnorm + learned positions: neither Llama nor GPT-2
    _one_line_error(
        cli("export", odd, "--format", "hf", "-o", tmp_path / "x"), "cannot export", "Llama needs"
    )
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    _one_line_error(
        cli("export", run, "--format", "hf", "-o", tmp_path / "full"), "not empty", "--overwrite"
    )
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    _one_line_error(
        cli("export", run, "--format", "onnx", "-o", tmp_path / "y"), "--format", "hf, gguf"
    )
    _one_line_error(
        cli("export", tmp_path / "nope", "--format", "hf", "-o", tmp_path / "z"),
        "no such run directory",
    )


# --- GGUF -----------------------------------------------------------------------------------


def _gguf():
    return pytest.importorskip(
        "gguf", reason="the gguf extra is not installed: pip install -e '.[gguf]'"
    )


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def test_gguf_reads_back_names_shapes_weights_and_tokenizer(run, cli, tmp_path):
    gguf = _gguf()
    path = tmp_path / "m.gguf"
    res = cli("export", run, "--format", "gguf", "-o", path, "--type", "f32")
    assert res.exit_code == 0, res.stderr
    reader = gguf.GGUFReader(path)
    meta = _fields(reader)
    model, _ = load_run_model(run)
    cfg = model.config
    assert meta["general.architecture"] == "llama"
    assert (
        meta["llama.block_count"],
        meta["llama.embedding_length"],
        meta["llama.feed_forward_length"],
    ) == (cfg.n_layers, cfg.dim, cfg.hidden_dim)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (
        cfg.n_heads,
        cfg.n_kv_heads,
    )
    assert (
        meta["llama.context_length"] == cfg.max_seq_len
        and meta["llama.rope.dimension_count"] == cfg.head_dim
    )

    tok = load_tokenizer(run / "tokenizer.model")
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (
        tok.bos_id,
        tok.eos_id,
    )
    types = meta["tokenizer.ggml.token_type"]
    assert [types[i] for i in tok.marker_ids.values()] == [gguf.TokenType.USER_DEFINED] * 4
    assert (
        types[tok.piece_to_id("<0x41>")] == gguf.TokenType.BYTE
        and types[1] == gguf.TokenType.CONTROL
    )
    assert meta["tokenizer.ggml.add_space_prefix"] is False

    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight"
        for i in range(cfg.n_layers)
        for n in (
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        )
    }
    assert set(tensors) == expected  # tied: no output.weight, llama.cpp reuses token_embd
    assert list(tensors["token_embd.weight"].shape) == [
        cfg.dim,
        cfg.vocab_size,
    ]  # ggml order: columns first
    assert list(tensors["blk.0.ffn_up.weight"].shape) == [cfg.dim, cfg.hidden_dim]
    state = model.state_dict()
    wq = torch.from_numpy(np.array(tensors["blk.1.attn_q.weight"].data))
    assert torch.equal(rope_pairs_to_halves(wq, cfg.n_heads), state["layers.1.attn.wq.weight"])
    down = torch.from_numpy(np.array(tensors["blk.0.ffn_down.weight"].data))
    assert torch.equal(down, state["layers.0.mlp.w2.weight"])


@pytest.mark.parametrize("kind, matrix_type", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_gguf_f16_and_q8_0_keep_norms_in_f32(run, kind, matrix_type, tmp_path):
    gguf = _gguf()
    from tformer_cli.interop.gguf_export import export_gguf

    export_gguf(run, tmp_path / "m.gguf", kind)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_up.weight"] == matrix_type
    assert _fields(reader)["general.file_type"] == {"f16": 1, "q8_0": 7}[kind]


def test_gguf_gpt2_chat_and_untied_runs(tmp_path):
    gguf = _gguf()
    from tformer_cli.interop.gguf_export import export_gguf

    gpt2 = make_run(tmp_path / "g", norm="layernorm", pos="learned", mlp="gelu", bias=True)
    export_gguf(gpt2, tmp_path / "g.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "g.gguf")
    names = {t.name for t in reader.tensors}
    assert _fields(reader)["general.architecture"] == "gpt2"
    assert {
        "position_embd.weight",
        "blk.0.attn_qkv.weight",
        "blk.0.attn_qkv.bias",
        "output_norm.bias",
    } <= names

    chat = make_run(tmp_path / "c", chat=True, tie_embeddings=False, n_kv_heads=2)
    export_gguf(chat, tmp_path / "c.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "c.gguf")
    meta = _fields(reader)
    assert (
        "<|assistant|>" in meta["tokenizer.chat_template"]
        and meta["tokenizer.ggml.eot_token_id"] == 7
    )
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors and list(tensors["blk.0.attn_k.weight"].shape) == [96, 2 * 24]


def test_gguf_errors(run, cli, tmp_path, monkeypatch):
    _gguf()
    path = tmp_path / "m.gguf"
    path.write_bytes(b"keep me")
    _one_line_error(
        cli("export", run, "--format", "gguf", "-o", path), "already exists", "--overwrite"
    )
    assert path.read_bytes() == b"keep me"
    _one_line_error(
        cli("export", run, "--format", "gguf", "-o", tmp_path / "n.gguf", "--type", "q4"), "--type"
    )
    monkeypatch.setitem(
        __import__("sys").modules, "gguf", None
    )  # as if the extra were not installed
    _one_line_error(
        cli("export", run, "--format", "gguf", "-o", tmp_path / "n.gguf"),
        "pip install 'tformer[gguf]'",
    )
