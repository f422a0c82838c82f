"""Sampling: seeded repeatability, filters, and the distributions they produce."""

from __future__ import annotations

import math

import pytest
import torch

from qwen_runner.sampling import Sampler, SamplingParams

PROBS = torch.tensor([0.5, 0.3, 0.2])
LOGITS = PROBS.log()


def frequencies(sampler: Sampler, logits: torch.Tensor, n: int = 20000) -> torch.Tensor:
    counts = torch.zeros(logits.numel())
    for _ in range(n):
        counts[sampler(logits)] += 1
    return counts / n


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams())(logits) == 1


def test_seed_repeats_and_different_seeds_differ():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = dict(temperature=1.0)
    first = [Sampler(SamplingParams(seed=7, **params))(logits) for _ in range(1)]
    a = Sampler(SamplingParams(seed=7, **params))
    b = Sampler(SamplingParams(seed=7, **params))
    c = Sampler(SamplingParams(seed=8, **params))
    seq_a = [a(logits) for _ in range(50)]
    assert seq_a == [b(logits) for _ in range(50)]
    assert seq_a != [c(logits) for _ in range(50)]
    assert first[0] == seq_a[0]


def test_temperature_one_matches_the_softmax():
    freq = frequencies(Sampler(SamplingParams(temperature=1.0, seed=0)), LOGITS)
    assert torch.allclose(freq, PROBS, atol=0.015)


def test_low_temperature_sharpens():
    probs = Sampler(SamplingParams(temperature=0.25)).probabilities(LOGITS)
    expected = PROBS**4 / (PROBS**4).sum()
    assert torch.allclose(probs, expected, atol=1e-6)
    assert probs[0] > 0.8


def test_top_k_keeps_k_tokens():
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert torch.allclose(sampler.probabilities(LOGITS), torch.tensor([0.625, 0.375, 0.0]), atol=1e-6)
    freq = frequencies(sampler, LOGITS, 5000)
    assert freq[2] == 0 and abs(freq[0] - 0.625) < 0.03


def test_top_p_keeps_the_smallest_set_reaching_p():
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.6))
    assert torch.allclose(sampler.probabilities(LOGITS), torch.tensor([0.625, 0.375, 0.0]), atol=1e-6)
    tiny = Sampler(SamplingParams(temperature=1.0, top_p=0.01))
    assert torch.allclose(tiny.probabilities(LOGITS), torch.tensor([1.0, 0.0, 0.0]))


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    sampler = Sampler(SamplingParams(temperature=1.0, min_p=0.5))  # threshold 0.25
    assert torch.allclose(sampler.probabilities(LOGITS), torch.tensor([0.625, 0.375, 0.0]), atol=1e-6)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    sampler = Sampler(SamplingParams(repetition_penalty=2.0))
    logits = torch.tensor([2.0, -1.0, 1.0])
    penalized = sampler.apply_repetition_penalty(logits, torch.tensor([0, 1, 0]))
    assert penalized.tolist() == [1.0, -2.0, 1.0]
    assert logits.tolist() == [2.0, -1.0, 1.0]  # input untouched
    assert sampler(torch.tensor([2.0, -1.0, 1.5]), torch.tensor([0])) == 2  # greedy moves off the repeat


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1),
                                 dict(top_k=-1), dict(repetition_penalty=0)])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_probabilities_sum_to_one_with_every_filter():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1))
    probs = Sampler(SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05)).probabilities(logits)
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5)
    assert 1 <= int((probs > 0).sum()) <= 50
