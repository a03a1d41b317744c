"""model.safetensors + config.json: bit-exact round trips and clear errors for damaged files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from models import CheckpointError, ModelConfig, Transformer, load_config, load_model, save_model


def small_model(**kw) -> Transformer:
    return Transformer(
        ModelConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, max_seq_len=32, **kw)
    )


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(tie_embeddings=False),
        dict(norm="layernorm", pos="learned", mlp="gelu", bias=True),
    ],
)
def test_save_then_load_is_bit_exact(tmp_path, kw):
    model = small_model(**kw)
    save_model(model, tmp_path, extra={"note": "kept"})
    loaded = load_model(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_config(tmp_path) == model.config
    assert json.loads((tmp_path / "config.json").read_text())["note"] == "kept"
    idx = torch.randint(0, 50, (1, 7))
    assert torch.equal(model.eval()(idx), loaded(idx))


def test_tied_embeddings_are_stored_once_and_retied_on_load(tmp_path):
    save_model(small_model(tie_embeddings=True), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "tok_emb.weight" in keys and "head.weight" not in keys
    loaded = load_model(tmp_path)
    assert loaded.head.weight.data_ptr() == loaded.tok_emb.weight.data_ptr()


def test_save_leaves_no_temporary_files(tmp_path):
    save_model(small_model(), tmp_path)
    save_model(small_model(), tmp_path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_load_casts_to_the_requested_dtype(tmp_path):
    save_model(small_model(), tmp_path)
    assert load_model(tmp_path, dtype=torch.bfloat16).tok_emb.weight.dtype == torch.bfloat16


def test_truncated_weights_give_a_clear_error(tmp_path):
    save_model(small_model(), tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_model(tmp_path)


def test_garbage_weights_give_a_clear_error(tmp_path):
    save_model(small_model(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x03not safetensors at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path)


def test_config_that_does_not_match_the_weights_names_the_tensor(tmp_path):
    save_model(small_model(), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["model"]["dim"] = 32
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"tok_emb.weight has shape \(50, 16\).*\(50, 32\)"):
        load_model(tmp_path)


def test_config_with_more_layers_than_the_weights_names_what_is_missing(tmp_path):
    save_model(small_model(), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["model"]["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="missing layers.2"):
        load_model(tmp_path)


def test_foreign_config_json_is_recognised(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    with pytest.raises(CheckpointError, match="not a tformer config"):
        load_model(tmp_path)


def test_invalid_json_config_names_line_and_column(tmp_path):
    (tmp_path / "config.json").write_text('{"format": "tformer",\n "model": {,}}')
    with pytest.raises(CheckpointError, match="line 2 column"):
        load_config(tmp_path)


def test_unknown_config_field_is_named(tmp_path):
    save_model(small_model(), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["model"]["n_experts"] = 8
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="unknown field.*n_experts"):
        load_config(tmp_path)


def test_missing_directory_says_what_to_check(tmp_path):
    with pytest.raises(CheckpointError, match="tformer run directory"):
        load_model(tmp_path / "nope")


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os

    from models.weights import atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "config.json", "{}")
    finally:
        os.umask(mask)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0o600
