"""Export a run as a GGUF file for llama.cpp and the tools built on it (needs the `gguf` extra)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from models.llamacpp import gguf_architecture, gguf_metadata, to_gguf_state
from tformer_cli.data.tokenizer import Tokenizer
from tformer_cli.errors import TformerError
from tformer_cli.interop.hf_export import (
    Export,
    cannot_write,
    chat_template,
    check_export_target,
    is_lora_run,
    load_for_export,
)
from tformer_cli.runs.locate import resolve_model_path

GGUF_TYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # q8_0 quantises rows in blocks of 32 values


def import_gguf():
    """The gguf package, or a TformerError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise TformerError(
            "--format gguf needs the gguf package: pip install 'tformer[gguf]'"
        ) from None
    return gguf


def export_gguf(
    run_dir: str | Path, out_file: str | Path, out_type: str = "f16", overwrite: bool = False
) -> Export:
    """Write run_dir as one GGUF file (LoRA runs merged): weights, hyperparameters and tokenizer."""
    gguf = import_gguf()
    if out_type not in GGUF_TYPES:
        raise TformerError(f"--type must be one of {', '.join(GGUF_TYPES)}, got {out_type!r}")
    run_dir, out = resolve_model_path(run_dir), Path(out_file)
    check_export_target(run_dir, out)
    if out.is_dir():
        raise TformerError(
            f"{out}: is a directory; --format gguf writes one file, e.g. -o model.gguf"
        )
    if out.exists() and not overwrite:
        raise TformerError(f"{out}: already exists; choose another name or pass --overwrite")
    model, info, tok, arch = load_for_export(run_dir, gguf_architecture, "GGUF")
    cfg = model.config
    state = to_gguf_state({k: v.detach() for k, v in model.state_dict().items()}, cfg)

    try:
        _write_gguf(gguf, run_dir, out, state, cfg, arch, tok, info, out_type, overwrite)
    except OSError as e:
        raise cannot_write(out, e) from None
    return Export(
        path=out,
        architecture=arch,
        params=sum(p.numel() for p in model.parameters()),
        files=[out.name],
        merged_lora=is_lora_run(run_dir),
    )


def _write_gguf(
    gguf,
    run_dir: Path,
    out: Path,
    state,
    cfg,
    arch: str,
    tok: Tokenizer,
    info: dict,
    out_type: str,
    overwrite: bool,
) -> None:
    """Write a temporary file beside out, then move it into place in one step.

    Without overwrite the move is a hard link, which fails if out appeared in the meantime, so
    a file that another process wrote there is never replaced.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(run_dir.resolve().name)
        for key, value in gguf_metadata(cfg).items():
            _add_value(gguf, writer, f"{arch}.{key}", value)
        writer.add_file_type(_file_type(gguf, out_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(gguf, writer, tok, info, cfg.vocab_size)
        for name, tensor in state.items():
            _add_tensor(gguf, writer, name, tensor, out_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, out)
        else:
            _move_no_clobber(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _move_no_clobber(tmp: str, out: Path) -> None:
    """Rename tmp to out unless out exists (atomically where the file system has hard links)."""
    taken = TformerError(f"{out}: already exists; choose another name or pass --overwrite")
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise taken from None
    except OSError:  # no hard links here (some network and FAT file systems): check, then rename
        if out.exists():
            raise taken from None
        os.replace(tmp, out)


def _add_value(gguf, writer, key: str, value) -> None:
    if isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_uint32(key, int(value))


def _file_type(gguf, out_type: str):
    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[out_type]


def _add_tensor(gguf, writer, name: str, tensor: torch.Tensor, out_type: str) -> None:
    """Norms, biases and other 1-D tensors stay f32 (as llama.cpp's converter keeps them)."""
    data = tensor.float().contiguous().numpy()
    if data.ndim == 1 or out_type == "f32":
        writer.add_tensor(name, data)
    elif out_type == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:  # f16, and q8_0 rows that are not whole blocks
        writer.add_tensor(name, data.astype(np.float16))


def _add_tokenizer(gguf, writer, tok: Tokenizer, info: dict, n_vocab: int) -> None:
    """The sentencepiece vocabulary as llama.cpp's "llama" (SPM) tokenizer, padded to the
    model's rows."""
    sp, types = tok.sp, gguf.TokenType
    markers = set(tok.marker_ids.values())
    kinds = []
    for i in range(tok.vocab_size):
        if sp.is_unknown(i):
            kinds.append(types.UNKNOWN)
        elif sp.is_control(i):
            kinds.append(types.CONTROL)
        elif sp.is_byte(i):
            kinds.append(types.BYTE)
        elif sp.is_unused(i):
            kinds.append(types.UNUSED)
        else:
            kinds.append(types.USER_DEFINED if i in markers else types.NORMAL)
    # llama.cpp wants one token per embedding row; rows the tokenizer never produces are unused
    extra = range(tok.vocab_size, n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(
        [sp.id_to_piece(i) for i in range(tok.vocab_size)] + [f"<unused{i}>" for i in extra]
    )
    writer.add_token_scores([sp.get_score(i) for i in range(tok.vocab_size)] + [0.0] * len(extra))
    writer.add_token_types([int(k) for k in kinds] + [int(types.UNUSED)] * len(extra))
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_unk_token_id(sp.unk_id())
    if tok.pad_id >= 0:
        writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(tok.adds_space_prefix)
    if template := chat_template(tok, info):
        writer.add_chat_template(template)
        writer.add_eot_token_id(tok.marker_ids["<|end|>"])
