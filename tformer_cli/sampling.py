"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, min-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tformer_cli.errors import TformerError


@dataclass
class SamplingConfig:
    """How to pick tokens; temperature 0 is greedy. 0 turns top_k off, 1 top_p, 0 min_p."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def validate(self) -> SamplingConfig:
        if self.temperature < 0:
            raise TformerError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise TformerError(f"--top-k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise TformerError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise TformerError(f"--min-p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise TformerError(f"--repetition-penalty must be > 0 (1 turns it off), got {self.repetition_penalty}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: divide positive logits of seen tokens by penalty, multiply negative ones. logits (B, V); seen (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature-scaled logits (B, V) with the tokens that top-k, top-p and min-p exclude set to -inf."""
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop = before >= cfg.top_p  # keep the smallest set reaching top_p (the top token always stays)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if cfg.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of each row (B,) from logits (B, V)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, cfg), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
