"""tformer's training step against a plain PyTorch loop of the same model, side by side.

    python benchmarks/train_vs_plain.py                 # nanoGPT shape and `small`, fp32 and bf16
    python benchmarks/train_vs_plain.py --shapes small --precisions bf16 --steps 10

The plain loop is what one writes from the papers with nothing tformer-specific: a GPT
nn.Module (pre-norm blocks, attention through F.scaled_dot_product_attention(is_causal=True),
nn.Dropout, tied embeddings), fused AdamW, torch.autocast for bf16, clip_grad_norm_. tformer's
step is the real one: training.loop.train_step on a model built and prepared as `tformer train`
builds it (training.trainable.build_trainable). Both see the same batches; the two loops run
interleaved, one step each in turn, and the table shows medians, so load from other processes
falls on both alike.

Shapes: "nanogpt" (6 layers, 384 wide, 6 heads, GELU, LayerNorm, learned positions, dropout 0.2,
a 65-character vocabulary: nanoGPT's shakespeare_char) and "small" (the preset, Llama-style, with
a 4096-token vocabulary as a corpus-trained tokenizer gives). Model FLOPs are
models.flops.flops_per_token (6N + 12·L·T·d); MFU is against this CPU's measured matmul peak at
the same precision. bf16 runs only where the CPU multiplies bf16 in hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import ModelConfig, Transformer, get_preset
from models.flops import flops_per_token
from tformer_cli.device import DTYPES, cpu_features, cpu_has_fast_bf16, matmul_peak_flops
from tformer_cli.training.budget import TimeBudget
from tformer_cli.training.config import TrainConfig
from tformer_cli.training.context import LoopSpec, RunContext
from tformer_cli.training.distributed import DistInfo
from tformer_cli.training.loop import train_step
from tformer_cli.training.state import RunState
from tformer_cli.training.trainable import build_trainable

SHAPES = {
    "nanogpt": dict(
        vocab_size=65,
        dim=384,
        n_layers=6,
        n_heads=6,
        max_seq_len=256,
        norm="layernorm",
        pos="learned",
        mlp="gelu",
        bias=False,
        dropout=0.2,
    ),
    "small": get_preset("small", vocab_size=4096).to_dict(),
}

# -- the plain loop: a textbook GPT ------------------------------------------------------------


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary positions (Su et al. 2021) on (B, H, T, hd), rotate-half layout."""
    T, hd = x.shape[-2:]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device).float() / hd)
    angles = torch.outer(torch.arange(T, device=x.device).float(), inv).repeat(1, 2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * angles.cos().to(x.dtype) + torch.cat((-x2, x1), -1) * angles.sin().to(x.dtype)


class PlainAttention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.q = nn.Linear(c.dim, c.dim, bias=c.bias)
        self.k = nn.Linear(c.dim, c.dim, bias=c.bias)
        self.v = nn.Linear(c.dim, c.dim, bias=c.bias)
        self.o = nn.Linear(c.dim, c.dim, bias=c.bias)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (
            f(x).view(B, T, self.c.n_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        if self.c.pos == "rope":
            q, k = rope(q, self.c.rope_theta), rope(k, self.c.rope_theta)
        p = self.c.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.drop(self.o(y.transpose(1, 2).reshape(B, T, D)))


class PlainMLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.swiglu = c.mlp == "swiglu"
        self.up = nn.Linear(c.dim, c.hidden_dim, bias=c.bias)
        self.gate = nn.Linear(c.dim, c.hidden_dim, bias=c.bias) if self.swiglu else None
        self.down = nn.Linear(c.hidden_dim, c.dim, bias=c.bias)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (
            F.silu(self.gate(x)) * self.up(x)
            if self.swiglu
            else F.gelu(self.up(x), approximate="tanh")
        )
        return self.drop(self.down(h))


def plain_norm(c: ModelConfig) -> nn.Module:
    if c.norm == "rmsnorm":
        return nn.RMSNorm(c.dim, eps=c.norm_eps)
    return nn.LayerNorm(c.dim, eps=c.norm_eps, bias=c.bias)


class PlainBlock(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n1, self.attn, self.n2, self.mlp = (
            plain_norm(c),
            PlainAttention(c),
            plain_norm(c),
            PlainMLP(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class PlainGPT(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.tok = nn.Embedding(c.vocab_size, c.dim)
        self.pos = nn.Embedding(c.max_seq_len, c.dim) if c.pos == "learned" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(PlainBlock(c) for _ in range(c.n_layers))
        self.norm = plain_norm(c)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.head.weight = self.tok.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(idx.size(1), device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def plain_step(model: PlainGPT, opt: torch.optim.Optimizer, precision: str, x, y) -> None:
    amp = (
        torch.autocast("cpu", dtype=DTYPES[precision])
        if precision != "fp32"
        else contextlib.nullcontext()
    )
    with amp:
        loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


# -- tformer's step ----------------------------------------------------------------------------


@dataclass
class FixedBatches:
    """The same batch at every step (what the plain loop trains on too)."""

    x: torch.Tensor
    y: torch.Tensor

    def batch(self, step: int, batch_size: int, rows: slice):
        return self.x[rows], self.y[rows]


def tformer_step(cfg: ModelConfig, precision: str, x, y) -> Any:
    """One call per step of training.loop.train_step, as `tformer train` would run it."""
    device = torch.device("cpu")
    tcfg = TrainConfig(batch_size=x.size(0), seq_len=x.size(1), precision=precision)
    ctx = RunContext(tcfg, device, precision, DistInfo(), TimeBudget(None))
    spec = LoopSpec(
        model_cfg=cfg,
        build_model=lambda: Transformer(cfg),
        train_batches=FixedBatches(x, y),
        val_batches=None,
        seq_len=x.size(1),
        save_weights=lambda *a: None,
        info={},
        tokenizer=None,
    )
    t, state, _ = build_trainable(ctx, spec)
    t.model.train()
    run = RunState()
    return lambda: train_step(ctx, spec, t, run, x.size(0), tcfg.lr), state.attention


# -- measuring ---------------------------------------------------------------------------------


def measure(shape: str, precision: str, batch: int, seq_len: int, steps: int) -> dict[str, Any]:
    cfg = ModelConfig.from_dict(SHAPES[shape])
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    torch.manual_seed(0)
    plain = PlainGPT(cfg).train()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=True)
    ours, attention = tformer_step(cfg, precision, x, y)
    loops = {"plain": lambda: plain_step(plain, opt, precision, x, y), "tformer": ours}
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(2):  # warm-up: allocator, oneDNN primitives
        for step in loops.values():
            step()
    for _ in range(steps):
        for name, step in loops.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    return {"ms": ms, "flops_per_token": flops_per_token(cfg, seq_len), "attention": attention}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="nanogpt,small")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=7, help="timed steps of each loop")
    args = parser.parse_args()
    cpu = cpu_name()
    print(f"CPU: {cpu} ({torch.get_num_threads()} threads; {' '.join(cpu_features())})")
    print(f"torch {torch.__version__}; batch {args.batch_size} x {args.seq_len} tokens")
    header = (
        f"{'shape':8} {'prec':5} {'loop':8} {'ms/step':>8} {'tokens/s':>9} {'GFLOP/s':>8} "
        f"{'MFU':>5} {'vs plain':>8}  attention"
    )
    print(header)
    print("-" * len(header))
    tokens = args.batch_size * args.seq_len
    for precision in args.precisions.split(","):
        if precision == "bf16" and not cpu_has_fast_bf16():
            print("bf16: skipped, this CPU has no hardware bf16 (AVX512-BF16/AMX)")
            continue
        peak = matmul_peak_flops(torch.device("cpu"), precision, seconds=1.0)
        for shape in args.shapes.split(","):
            r = measure(shape, precision, args.batch_size, args.seq_len, args.steps)
            for loop in ("plain", "tformer"):
                ms = r["ms"][loop]
                flops = r["flops_per_token"] * tokens / (ms / 1000)
                ratio = r["ms"]["plain"] / ms
                attention = "sdpa" if loop == "plain" else r["attention"]
                print(
                    f"{shape:8} {precision:5} {loop:8} {ms:8.0f} {tokens / ms * 1000:9,.0f} "
                    f"{flops / 1e9:8.1f} {100 * flops / peak:4.0f}% {ratio:7.2f}x  {attention}"
                )
        print(f"{'':23}(matmul peak {precision}: {peak / 1e9:,.0f} GFLOP/s)")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
