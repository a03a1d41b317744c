"""Sampling filters on known logits."""

from __future__ import annotations

import math

import pytest
import torch

from tformer_cli.errors import TformerError
from tformer_cli.inference.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    argmax,
    draw,
    filter_logits,
    sample,
)

# probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625
LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]]))


def kept(cfg: SamplingConfig) -> list[int]:
    return torch.isfinite(filter_logits(LOGITS, cfg))[0].nonzero().flatten().tolist()


def test_top_k_keeps_the_k_most_likely():
    assert kept(SamplingConfig(temperature=1, top_k=2)) == [0, 1]
    assert kept(SamplingConfig(temperature=1, top_k=0)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "top_p, expected",
    [(0.5, [0]), (0.6, [0, 1]), (0.75, [0, 1]), (0.8, [0, 1, 2]), (1.0, [0, 1, 2, 3, 4])],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    assert kept(SamplingConfig(temperature=1, top_p=top_p)) == expected


@pytest.mark.parametrize(
    "min_p, expected",
    [
        (0.0, [0, 1, 2, 3, 4]),
        (0.125, [0, 1, 2, 3, 4]),
        (0.25, [0, 1, 2]),
        (0.26, [0, 1]),
        (0.5, [0, 1]),
        (1.0, [0]),
    ],
)
def test_min_p_drops_tokens_below_min_p_times_the_top(min_p, expected):
    assert kept(SamplingConfig(temperature=1, min_p=min_p)) == expected


def test_temperature_scales_logits():
    out = filter_logits(LOGITS, SamplingConfig(temperature=0.5))
    assert torch.allclose(out, LOGITS / 0.5)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_greedy_and_seeded_sampling():
    cfg = SamplingConfig(temperature=0)
    assert sample(LOGITS, cfg).tolist() == [0]
    hot = SamplingConfig(temperature=1.0)
    a = [sample(LOGITS, hot, torch.Generator().manual_seed(7)).item() for _ in range(1)]
    b = [sample(LOGITS, hot, torch.Generator().manual_seed(7)).item() for _ in range(1)]
    assert a == b
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(
        torch.stack([sample(LOGITS, hot, gen) for _ in range(4000)]).flatten(), minlength=5
    )
    assert math.isclose(counts[0].item() / 4000, 0.5, abs_tol=0.03)
    only_top = SamplingConfig(temperature=1.0, top_k=1)
    assert all(sample(LOGITS, only_top, gen).item() == 0 for _ in range(50))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(temperature=-1), "--temperature"),
        (dict(top_k=-1), "--top-k"),
        (dict(top_p=0), "--top-p"),
        (dict(top_p=1.5), "--top-p"),
        (dict(min_p=2), "--min-p"),
        (dict(repetition_penalty=0), "--repetition-penalty"),
    ],
)
def test_invalid_values_are_refused(kw, message):
    with pytest.raises(TformerError, match=message):
        SamplingConfig(**kw).validate()


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_on_a_large_vocabulary_matches_a_full_sort(top_p):
    logits = (
        torch.randn(3, 5000, generator=torch.Generator().manual_seed(1)) * 3
    )  # the nucleus spans thousands
    got = torch.isfinite(filter_logits(logits, SamplingConfig(temperature=1, top_p=top_p)))
    probs, order = torch.softmax(logits, -1).sort(-1, descending=True)
    keep_sorted = (probs.cumsum(-1) - probs) < top_p
    want = torch.zeros_like(got).scatter(-1, order, keep_sorted)
    assert torch.equal(got, want)


def test_uniform_top_p_keeps_exactly_that_share():
    kept = torch.isfinite(
        filter_logits(torch.zeros(1, 1000), SamplingConfig(temperature=1, top_p=0.5))
    )
    assert kept.sum().item() == 500


def test_draw_never_picks_zero_probability_tokens_and_follows_the_seed():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(2000, 1)
    picks = draw(probs, torch.Generator().manual_seed(3))
    assert set(picks.tolist()) == {1, 3}
    assert math.isclose((picks == 1).float().mean().item(), 0.5, abs_tol=0.05)
    assert torch.equal(picks, draw(probs, torch.Generator().manual_seed(3)))


def test_argmax_takes_the_first_of_equal_logits():
    assert argmax(torch.tensor([[1.0, 3.0, 3.0], [5.0, 5.0, 0.0]])).tolist() == [1, 0]


def test_repetition_penalty_changes_the_greedy_pick():
    logits = torch.tensor([[2.0, 1.5, 0.1]])
    seen = torch.tensor([[True, False, False]])
    assert sample(logits, SamplingConfig(temperature=0), seen=seen).tolist() == [0]
    penalised = SamplingConfig(temperature=0, repetition_penalty=2.0)
    assert sample(logits, penalised, seen=seen).tolist() == [1]  # 2.0 / 2 < 1.5


def test_replace_validates():
    cfg = SamplingConfig().replace(temperature=0.3)
    assert cfg.temperature == 0.3
    with pytest.raises(TformerError, match="--min-p"):
        cfg.replace(min_p=-0.1)


def test_top_k_sampling_draws_only_among_the_k_in_proportion():
    gen = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(temperature=1.0, top_k=2)
    picks = torch.cat([sample(LOGITS.repeat(500, 1), cfg, gen) for _ in range(4)])
    assert set(picks.tolist()) == {0, 1}
    assert math.isclose((picks == 0).float().mean().item(), 2 / 3, abs_tol=0.03)  # 0.5 : 0.25
