"""Drawing tokens from logits: suppressed ids, temperature, nucleus, float64, a seeded generator."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 means greedy; top_p < 1 keeps the smallest set of tokens whose
    probability reaches top_p; float64 draws in double precision, as the paper's evaluation does."""

    temperature: float = 1.0
    top_p: float = 1.0
    float64: bool = True

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the nucleus set to -inf; the most likely token always survives."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_categorical(logits: torch.Tensor, options: SamplingOptions = SamplingOptions(), *,
                       suppress: Sequence[int] = (), generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of `logits` [..., V] -> ids [...].

    Suppressed ids (the mask token) are removed before temperature and nucleus filtering, so
    they never take part in the nucleus mass. Sampling is an exponential race
    (argmax p / E, E ~ Exp(1)), which equals a categorical draw and is exact in float64.
    """
    logits = logits.to(torch.float64 if options.float64 else torch.float32)
    if suppress:
        logits = logits.index_fill(-1, torch.tensor(list(suppress), device=logits.device), float("-inf"))
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    if options.temperature != 1:
        logits = logits / options.temperature
    if options.top_p < 1:
        logits = filter_top_p(logits, options.top_p)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)
