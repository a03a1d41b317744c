"""What quantization costs in quality: the quantized model's predictions next to fp32's.

`profile --quantize int8` runs the model twice on the same tokens, in fp32 and quantized, and
reports how far apart their next-token distributions are:

- on the run's own held-out text when the run recorded its corpus (config.json "data": the last
  val_fraction of each .txt file, as training split it) and the files are still there: the
  validation loss in fp32 and quantized, and its relative change, is the figure that matters;
- otherwise (a preset, a config file, a run whose corpus is gone) on random tokens, where the
  loss itself means nothing but the divergence still measures how much int8 moves the output.

Either way: the mean KL divergence KL(fp32 || quantized) in nats per token, and how often the
two models' most likely next token agree (what greedy decoding would pick).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.quantize import quantize_model
from tformer_cli.data.pretokenize import split_offset
from tformer_cli.profiling.source import ModelSource

HELD_OUT_BYTES = 256 << 10  # of each corpus file's validation tail: plenty for WINDOWS windows
WINDOWS = 8  # sequences evaluated, each up to the model's context (at most MAX_T tokens)
MAX_T = 256


def _held_out_text(source: ModelSource) -> tuple[str, str] | None:
    """(text, where) from the start of the run's validation split, or None when unavailable."""
    if source.kind != "run" or source.path is None:
        return None
    from tformer_cli.runs.rundir import read_dir_config

    data = (read_dir_config(source.path) or {}).get("data") or {}
    files, fraction = data.get("files") or [], data.get("val_fraction")
    texts, names = [], []
    for entry in files if isinstance(fraction, (int, float)) else []:
        path = Path(str(entry.get("path", "")))
        if path.suffix != ".txt" or not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return None  # gone, changed, or not plain text: the split cannot be rebuilt here
        with path.open("rb") as f:
            f.seek(split_offset(entry["bytes"], fraction))
            raw = f.read(HELD_OUT_BYTES)
        cut = raw.find(b"\n") + 1  # training moved the split to the next line break
        texts.append(raw[cut:].decode("utf-8", errors="replace"))
        names.append(path.name)
    if not texts:
        return None
    return "\n".join(texts), f"held-out text of the run ({', '.join(names)})"


def _tokens(source: ModelSource, seq_len: int) -> tuple[torch.Tensor, str]:
    """(B, T + 1) token ids to evaluate on, and what they are."""
    cfg = source.config
    T = min(seq_len, cfg.max_seq_len, MAX_T)
    held_out = _held_out_text(source)
    if held_out is not None:
        from tformer_cli.data.tokenizer import load_tokenizer

        text, where = held_out
        ids = load_tokenizer(source.path / "tokenizer.model").encode(text)
        rows = min(WINDOWS, len(ids) // (T + 1))
        if rows:
            flat = torch.tensor(ids[: rows * (T + 1)])
            return flat.view(rows, T + 1), where
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (WINDOWS, T + 1), generator=gen), "random tokens"


@torch.inference_mode()
def quantization_quality(source: ModelSource, scheme: str, seq_len: int) -> dict[str, Any]:
    """The fp32 and the scheme-quantized model on the same tokens (on the CPU, where the int8
    kernels run): losses, mean KL divergence and top-1 agreement."""
    tokens, where = _tokens(source, seq_len)
    x, y = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    reference = source.build().eval()
    logits = reference(x).flatten(0, 1).float()  # (B*T, V)
    del reference
    quantized = quantize_model(source.build(), scheme)
    q_logits = quantized(x).flatten(0, 1).float()
    loss, q_loss = F.cross_entropy(logits, y).item(), F.cross_entropy(q_logits, y).item()
    logp, q_logp = logits.log_softmax(-1), q_logits.log_softmax(-1)
    kl = (logp.exp() * (logp - q_logp)).sum(-1).mean().item()
    agree = (logits.argmax(-1) == q_logits.argmax(-1)).float().mean().item()
    return {
        "text": where,
        "tokens": y.numel(),
        "loss_fp32": loss,
        f"loss_{scheme}": q_loss,
        "loss_change": (q_loss - loss) / loss if loss else 0.0,
        "uniform_loss": math.log(source.config.vocab_size),
        "kl_nats_per_token": kl,
        "top1_agreement": agree,
    }
