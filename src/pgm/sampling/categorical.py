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


def sampling_logits(logits: torch.Tensor, options: SamplingOptions, suppress: Sequence[int] = ()) -> torch.Tensor:
    """The logits of the distribution actually sampled: suppressed ids (the mask token) removed
    first, so they never take part in the nucleus mass, then temperature, then the nucleus."""
    logits = logits.to(torch.float64 if options.float64 else torch.float32)
    if suppress:
        logits = logits.index_fill(-1, torch.tensor(list(suppress), device=logits.device), float("-inf"))
    if options.temperature not in (0, 1):
        logits = logits / options.temperature
    if options.top_p < 1:
        logits = filter_top_p(logits, options.top_p)
    return logits


def _draw(logits: torch.Tensor, options: SamplingOptions, generator) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform per row, located in the cumulative distribution. It
    costs a cumulative sum per row instead of a random number per vocabulary entry."""
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1).reshape(-1, logits.shape[-1])
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=probs.dtype, device=probs.device, generator=generator) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)
    # u can only land on a zero-probability id by rounding at the very top of the CDF; never return one.
    tokens = torch.where(probs.gather(1, tokens) > 0, tokens, probs.argmax(dim=-1, keepdim=True))
    return tokens.view(logits.shape[:-1])


def sample_categorical(logits: torch.Tensor, options: SamplingOptions = SamplingOptions(), *,
                       suppress: Sequence[int] = (), generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of `logits` [..., V] -> ids [...]."""
    return _draw(sampling_logits(logits, options, suppress), options, generator)


def sample_scored(logits: torch.Tensor, score: str, options: SamplingOptions = SamplingOptions(), *,
                  suppress: Sequence[int] = (), generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws [...] and how certain each is, under the sampled distribution: "confidence" (the
    drawn token's probability), "margin" (top-1 minus top-2 probability) or "entropy" (minus
    the entropy). Higher is more certain."""
    logits = sampling_logits(logits, options, suppress)
    tokens = _draw(logits, options, generator)
    log_probs = logits.log_softmax(dim=-1)
    if score == "confidence":
        certainty = log_probs.gather(-1, tokens[..., None])[..., 0].exp()
    elif score == "margin":
        top = log_probs.topk(2, dim=-1).values.exp()
        certainty = top[..., 0] - top[..., 1]
    elif score == "entropy":
        probs = log_probs.exp()
        certainty = (probs * log_probs.clamp(min=torch.finfo(log_probs.dtype).min)).sum(-1)
    else:
        raise ValueError(f"score must be confidence, margin or entropy, got {score!r}")
    return tokens, certainty
