"""Token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded.

Operates on one row of float32 logits (batch 1 decode); filters compose in the order
llama.cpp and transformers use: penalty -> temperature -> top-k -> top-p -> min-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables
    repetition_penalty: float = 1.0  # 1 disables
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise ValueError("min_p must be in [0, 1)")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks the next token; owns its random generator so runs with a seed repeat exactly."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def apply_repetition_penalty(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """CTRL-style penalty (as transformers): divide positive logits, multiply negative ones."""
        penalty = self.params.repetition_penalty
        if penalty == 1.0 or history.numel() == 0:
            return logits
        logits = logits.clone()
        seen = torch.unique(history)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
        return logits

    def probabilities(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution sampled from, after every filter (exposed for tests)."""
        p = self.params
        logits = logits.float()
        if history is not None:
            logits = self.apply_repetition_penalty(logits, history)
        logits = logits / max(p.temperature, 1e-6)
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above each token
            sorted_probs[before >= p.top_p] = 0.0  # always keeps the top token
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return probs / probs.sum()

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> int:
        if self.params.greedy:
            if history is not None:
                logits = self.apply_repetition_penalty(logits, history)
            return int(torch.argmax(logits))
        return int(torch.multinomial(self.probabilities(logits, history), 1, generator=self.generator))
