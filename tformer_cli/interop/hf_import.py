"""Import a local Hugging Face Llama checkpoint directory into a tformer run directory."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from models import Transformer
from models.config import ConfigError, ModelConfig
from models.hf import config_from_llama, from_llama_state
from models.weights import CheckpointError, atomic_write, load_tensors, save_model
from tformer_cli.data.tokenizer import Tokenizer, load_tokenizer
from tformer_cli.errors import TformerError
from tformer_cli.runs.rundir import TOKENIZER_FILE

INDEX_FILE = "model.safetensors.index.json"


@dataclass
class Import:
    """What an import wrote."""

    path: Path
    params: int
    vocab_size: int
    tokenizer_vocab_size: int
    has_chat_markers: bool
    source_dtype: str


@dataclass
class HFLlama:
    """A Hugging Face Llama checkpoint read into memory (fp32), its source directory untouched."""

    model: Transformer
    tokenizer: Tokenizer
    source_dtype: str


def check_hf_llama(hf_dir: str | Path) -> ModelConfig:
    """The tformer config of a Hugging Face Llama directory, after checking config and tokenizer.

    Reads only config.json and tokenizer.model, so it is cheap; read_hf_llama loads the weights.
    """
    src = Path(hf_dir)
    if not src.is_dir():
        raise TformerError(f"{src}: no such directory; give a local Hugging Face model directory")
    hf_cfg = _read_json(src / "config.json")
    try:
        cfg = config_from_llama(hf_cfg)
    except ConfigError as e:
        raise TformerError(f"{src}: {e}") from None
    except KeyError as e:
        raise TformerError(
            f"{src / 'config.json'}: missing {e.args[0]!r}, which a Llama config needs"
        ) from None
    if not (src / TOKENIZER_FILE).is_file():
        others = [n for n in ("tokenizer.json", "tokenizer_config.json") if (src / n).is_file()]
        hint = (
            f" (it has only {', '.join(others)}, a Hugging Face tokenizers file tformer cannot use)"
            if others
            else ""
        )
        raise TformerError(f"{src}: no sentencepiece tokenizer.model{hint}; tformer needs one")
    return cfg


def read_hf_llama(hf_dir: str | Path) -> HFLlama:
    """Load a Llama-architecture checkpoint (safetensors + config.json + tokenizer.model) as fp32.

    Nothing is written: `tformer import` saves the result, `--model HF_DIR` uses it in place.
    """
    src = Path(hf_dir)
    cfg = check_hf_llama(src)
    tok = load_tokenizer(src / TOKENIZER_FILE)
    if tok.vocab_size > cfg.vocab_size:
        raise TformerError(
            f"{src}: tokenizer.model has {tok.vocab_size} tokens "
            f"but the model embeds only {cfg.vocab_size}"
        )
    hf_state = _read_weights(src)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in hf_state.values()})
    missing = [k for k in _needed(cfg) if k not in hf_state]
    if missing:
        raise TformerError(
            f"{src}: the weights lack {missing[0]} ({len(missing)} tensors missing); "
            "is this a Llama checkpoint?"
        )
    state = {k: v.float() for k, v in from_llama_state(hf_state, cfg).items()}
    model = Transformer(cfg)
    try:
        model.load_state_dict(state, strict=not cfg.tie_embeddings)  # a tied head shares tok_emb
    except RuntimeError as e:
        raise TformerError(
            f"{src}: weights do not match config.json: {str(e).splitlines()[1].strip()}"
        ) from None
    return HFLlama(model=model.eval(), tokenizer=tok, source_dtype=",".join(dtypes))


def import_hf(hf_dir: str | Path, run_dir: str | Path, overwrite: bool = False) -> Import:
    """Read a Llama-architecture checkpoint (safetensors + config.json + tokenizer.model) into
    run_dir, in fp32."""
    from tformer_cli.runs.target import (  # run_target builds on rundir, which imports this module
        check_run_dir_use,
        claim_given,
        clear_run_dir,
        refuse_output_over_inputs,
    )

    src, out = Path(hf_dir), Path(run_dir)
    check_hf_llama(src)
    refuse_output_over_inputs(out, [], [src])
    if out.exists() and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TformerError(
            f"{out}: already exists and is not empty; choose a new directory or pass --overwrite"
        )
    target, failed = claim_given(out, resume=False, overwrite=overwrite), True
    try:
        check_run_dir_use(out, resume=False, overwrite=overwrite)
        hf = read_hf_llama(src)  # every check passes before an --overwrite removes anything
        model, tok, cfg = hf.model, hf.tokenizer, hf.model.config
        clear_run_dir(out, resume=False)
        # config.json binds the tokenizer by the sha256 of the very bytes written beside it
        tokenizer_bytes = (src / TOKENIZER_FILE).read_bytes()
        atomic_write(out / TOKENIZER_FILE, lambda tmp: Path(tmp).write_bytes(tokenizer_bytes))
        extra = {
            "imported_from": str(src.resolve()),
            "source_dtype": hf.source_dtype,
            "tokenizer_sha256": hashlib.sha256(tokenizer_bytes).hexdigest(),
        }
        save_model(model, out, extra=extra)
        failed = False
    finally:
        target.release(failed)
    return Import(
        path=out,
        params=sum(p.numel() for p in model.parameters()),
        vocab_size=cfg.vocab_size,
        tokenizer_vocab_size=tok.vocab_size,
        has_chat_markers=tok.has_chat_markers,
        source_dtype=hf.source_dtype,
    )


def _needed(cfg) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [] if cfg.tie_embeddings else ["lm_head.weight"]
    for i in range(cfg.n_layers):
        names += [
            f"model.layers.{i}.{n}"
            for n in (
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            )
        ]
    return names


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise TformerError(f"{path}: missing; a Hugging Face model directory has a config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TformerError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def hf_weight_files(src: Path) -> list[Path]:
    """The safetensors files of a Hugging Face directory: model.safetensors, or the indexed
    shards."""
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    if (src / INDEX_FILE).is_file():
        index = _read_json(src / INDEX_FILE)
        files = [src / name for name in sorted(set(index.get("weight_map", {}).values()))]
        if not files:
            raise TformerError(f"{src / INDEX_FILE}: its weight_map is empty")
        for path in files:
            if not path.is_file():
                raise TformerError(f"{path}: a weight shard named in {INDEX_FILE} is missing")
        return files
    if any(src.glob("*.bin")) or any(src.glob("*.pt")):
        raise TformerError(
            f"{src}: only pickled PyTorch weights (.bin/.pt); tformer never unpickles, "
            "so it imports safetensors only (save with safe_serialization=True)"
        )
    raise TformerError(f"{src}: no model.safetensors or {INDEX_FILE}")


def _read_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards an index names. Pickles are refused."""
    state: dict[str, torch.Tensor] = {}
    for path in hf_weight_files(src):
        try:
            state.update(load_tensors(path))
        except CheckpointError as e:
            raise TformerError(str(e)) from None
    return state
