"""Export a run as a Hugging Face model directory that transformers' Auto classes load."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from models.config import ConfigError
from models.hf import gpt2_config, hf_architecture, llama_config, to_gpt2_state, to_llama_state
from models.weights import atomic_write, atomic_write_text, save_tensors
from tformer_cli.data.tokenizer import Tokenizer, load_tokenizer
from tformer_cli.errors import TformerError
from tformer_cli.inference.text import end_ids
from tformer_cli.runs.locate import resolve_model_path
from tformer_cli.runs.lock import LOCK_FILE, RunLock
from tformer_cli.runs.rundir import ADAPTER_FILE, TOKENIZER_FILE, is_run_dir, load_run_model

# The chat template of chat_template.py, in the Jinja that transformers' apply_chat_template runs.
CHAT_TEMPLATE_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
HF_FILES = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@dataclass
class Export:
    """What an export wrote."""

    path: Path
    architecture: str
    params: int
    files: list[str]
    merged_lora: bool


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory (or an existing file) unless overwrite.

    The lock file of an export writing there now does not count: RunLock names that process.
    """
    if out.exists() and not out.is_dir():
        raise TformerError(f"{out}: exists and is not a directory; give a new directory with -o")
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) and not overwrite:
        raise TformerError(f"{out}: is not empty; choose a new directory or pass --overwrite")


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_export_target(run_dir: Path, out: Path) -> None:
    """Refuse an output that would write into a run (the exported one or any other): lose no run.

    Paths are compared resolved (symlinks followed), so another spelling of the run is caught too.
    """
    src, dst = run_dir.resolve(), out.resolve()
    if _within(dst, src):
        raise TformerError(
            f"-o {out} lies inside the run being exported ({run_dir}); choose a path outside it"
        )
    if _within(src, dst):
        raise TformerError(
            f"-o {out} contains the run being exported ({run_dir}); choose a path outside it"
        )
    if is_run_dir(dst):
        raise TformerError(
            f"-o {out} is a tformer run, which an export never replaces "
            "(not even with --overwrite); choose a new path"
        )
    for folder in dst.parents:
        if is_run_dir(folder):
            raise TformerError(
                f"-o {out} lies inside the run {folder}; an export never writes "
                "into a run: choose a path outside it"
            )


def cannot_write(out: Path, e: OSError) -> TformerError:
    """The one-line error for an export that the file system refused (permissions, disk full)."""
    return TformerError(
        f"{out}: cannot write the export ({e.strerror or e}); "
        "check the path, its permissions and the free space"
    )


def load_for_export(run_dir: Path, architecture, target: str):
    """(model, config.json, tokenizer, architecture name) of a run, or why target cannot hold it."""
    model, info = load_run_model(run_dir)
    try:
        arch = architecture(model.config)
    except ConfigError as e:
        raise TformerError(f"{run_dir}: cannot export to {target}: {e}") from None
    return model, info, load_tokenizer(run_dir / TOKENIZER_FILE), arch


def chat_template(tok: Tokenizer, info: dict) -> str | None:
    """The Jinja chat template for runs fine-tuned for chat (None for base models)."""
    return CHAT_TEMPLATE_JINJA if info.get("chat") and tok.has_chat_markers else None


def export_hf(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Export:
    """Write run_dir as a transformers model directory (LoRA runs merged); return what was
    written."""
    run_dir, out = resolve_model_path(run_dir), Path(out_dir)
    check_export_target(run_dir, out)
    check_output_dir(out, overwrite)
    model, info, tok, arch = load_for_export(run_dir, hf_architecture, "Hugging Face")
    try:
        with RunLock(out):  # one writer: a second export (or a run) into out is refused
            check_output_dir(out, overwrite)  # again, now that nobody else can write there
            return _write_hf(run_dir, out, model, info, tok, arch)
    except OSError as e:
        raise cannot_write(out, e) from None


def _write_hf(run_dir: Path, out: Path, model, info: dict, tok: Tokenizer, arch: str) -> Export:
    hf_state, hf_cfg, generation = _model_files(model, tok, arch)
    tokens, tok_cfg = _tokenizer_files(tok, info, model.config.max_seq_len)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(hf_state, out / "model.safetensors", metadata={"format": "pt"})
    _write_json(out / "config.json", hf_cfg)
    _write_json(out / "generation_config.json", generation)
    atomic_write(
        out / "tokenizer.model", lambda tmp: shutil.copyfile(run_dir / TOKENIZER_FILE, tmp)
    )
    _write_json(out / "tokenizer_config.json", tok_cfg)
    _write_json(out / "special_tokens_map.json", tokens)
    return Export(
        path=out,
        architecture=arch,
        params=sum(p.numel() for p in model.parameters()),
        files=list(HF_FILES),
        merged_lora=is_lora_run(run_dir),
    )


def _model_files(model, tok: Tokenizer, arch: str) -> tuple[dict, dict, dict]:
    """The weights under transformers' names, config.json and generation_config.json."""
    cfg = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if arch == "LlamaForCausalLM":
        hf_state, hf_cfg = to_llama_state(state, cfg), llama_config(cfg)
        if cfg.tie_embeddings:
            del hf_state["lm_head.weight"]  # transformers ties it back from the embeddings
    else:
        hf_state, hf_cfg = to_gpt2_state(state, cfg), gpt2_config(cfg)
        del hf_state["lm_head.weight"]
    special = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    if tok.pad_id >= 0:
        special["pad_token_id"] = tok.pad_id
    hf_cfg.update(special, torch_dtype="float32")
    generation = {**special, "eos_token_id": list(end_ids(tok))}  # as `tformer generate` stops
    return hf_state, hf_cfg, generation


def _tokenizer_files(tok: Tokenizer, info: dict, max_len: int) -> tuple[dict, dict]:
    """special_tokens_map.json and tokenizer_config.json for transformers' LlamaTokenizer."""
    sp = tok.sp
    tokens = {
        "bos_token": sp.id_to_piece(tok.bos_id),
        "eos_token": sp.id_to_piece(tok.eos_id),
        "unk_token": sp.id_to_piece(sp.unk_id()),
    }
    if tok.pad_id >= 0:
        tokens["pad_token"] = sp.id_to_piece(tok.pad_id)
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        **tokens,
        "add_bos_token": True,  # tformer prompts start with BOS, as the model was trained
        "add_eos_token": False,
        "add_prefix_space": tok.adds_space_prefix,
        "legacy": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    if tok.has_chat_markers:
        tok_cfg["additional_special_tokens"] = list(tok.marker_ids)
    if template := chat_template(tok, info):
        tok_cfg["chat_template"] = template
    return tokens, tok_cfg


def is_lora_run(run_dir: Path) -> bool:
    """An unmerged LoRA fine-tune: an adapter beside no full weights (export merges it)."""
    return (run_dir / ADAPTER_FILE).is_file() and not (run_dir / "model.safetensors").is_file()


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
