"""Drawing tokens from logits: suppressed ids, temperature, nucleus, float64, a seeded generator."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..errors import SamplingError


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 means greedy; top_k > 0 keeps the k most likely tokens; top_p < 1 keeps the
    smallest set of tokens whose probability reaches top_p; float64 locates the draw in a float64 cumulative distribution (the
    paper samples in float64: in lower precision, small probabilities are misrepresented)."""

    temperature: float = 1.0
    top_p: float = 1.0
    float64: bool = True
    top_k: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise SamplingError(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must lie in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k must be a non-negative integer (0: every token), got {self.top_k!r}")


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
    first, so they never take part in the nucleus mass, then temperature, the k most likely, then
    the nucleus."""
    logits = logits.to(torch.float32, copy=True)  # our own copy: the steps below work in place
    if suppress:
        logits.index_fill_(-1, torch.tensor(list(suppress), device=logits.device), float("-inf"))
    if options.temperature not in (0, 1):
        logits.div_(options.temperature)
    if 0 < options.top_k < logits.shape[-1]:
        kth = logits.topk(options.top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))  # ties with the k-th stay
    if options.top_p < 1:
        logits = filter_top_p(logits, options.top_p)
    return logits


def _draw(logits: torch.Tensor, options: SamplingOptions, generator, uniforms: torch.Tensor | None = None
          ) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform per row, located in the cumulative distribution (the
    first id whose cumulative probability exceeds it). It costs a cumulative sum per row instead
    of a random number per vocabulary entry, and can never return a zero-probability id.
    `uniforms` [...] in [0, 1), when given, are those numbers instead of fresh ones."""
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1).reshape(-1, logits.shape[-1])
    cdf = probs.cumsum(dim=-1, dtype=torch.float64 if options.float64 else torch.float32)
    total = cdf[:, -1:]
    if uniforms is None:
        uniforms = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device, generator=generator)
    u = uniforms.reshape(total.shape).to(cdf.dtype) * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))  # strictly below the total, whatever the rounding
    return torch.searchsorted(cdf, u, right=True).view(logits.shape[:-1])


def sample_categorical(logits: torch.Tensor, options: SamplingOptions = SamplingOptions(), *,
                       suppress: Sequence[int] = (), generator: torch.Generator | None = None,
                       uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row of `logits` [..., V] -> ids [...]; `uniforms` [...], when given, locate
    the draws instead of fresh random numbers (see `_draw`)."""
    return _draw(sampling_logits(logits, options, suppress), options, generator, uniforms)


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
        raise SamplingError(f"score must be confidence, margin or entropy, got {score!r}")
    return tokens, certainty
