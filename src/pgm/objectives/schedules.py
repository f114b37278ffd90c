"""Noise schedules and time sampling: the log-linear schedule of the text models and the arccos
schedule of the image models (their training and their samplers share it)."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LogLinearSchedule:
    """alpha_t = 1 - (1 - eps) t: the probability that a token is still clean at time t.

    The ELBO weight of a masked token is -alpha'_t / (1 - alpha_t) = 1 / t.
    """

    eps: float = 1e-3

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps < 1.0:
            raise ConfigError(f"the schedule's eps must lie in [0, 1), got {self.eps}")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - (1 - self.eps) * t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1 / t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise -log(alpha_t): what a time-conditioned model receives."""
        return -torch.log1p(-(1 - self.eps) * t)

    def complement(self, t: torch.Tensor) -> torch.Tensor:
        """The time s at which the masked share equals the clean share at t: 1 - alpha_s = alpha_t.

        This is 1 - t up to O(eps); unlike 1 - t it keeps the swapped view's ELBO exact and
        its weight 1/s bounded by (1 - eps) / eps.
        """
        return 1 / (1 - self.eps) - t

    def reveal_probability(self, t, s):
        """Probability that a token still masked at time t is revealed by time s < t: floats, or
        tensors, where it is 1 wherever s = 0 (also where t = 0: nothing is left to reveal)."""
        alpha_t, alpha_s = 1 - (1 - self.eps) * t, 1 - (1 - self.eps) * s
        if torch.is_tensor(t):
            return torch.where(s <= 0, 1.0, (alpha_s - alpha_t) / (1 - alpha_t).clamp(min=1e-12))
        return (alpha_s - alpha_t) / (1 - alpha_t)


def sample_times(batch_size: int, *, antithetic: bool = True, t_min: float = 1e-3,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Times in [t_min, 1). Antithetic (stratified) sampling puts one time in each of the
    `batch_size` equal strata of [0, 1), which lowers the variance of the batch's loss."""
    u = torch.rand(batch_size, generator=generator, device=device)
    if antithetic:
        u = (u / batch_size + torch.arange(batch_size, device=u.device) / batch_size) % 1
    return (1 - t_min) * u + t_min


def arccos_share(t: torch.Tensor) -> torch.Tensor:
    """The arccos schedule: the share of an image's tokens hidden at time t in [0, 1],
    arccos(t) / (pi / 2): 1 at t = 0, 0 at t = 1. Computed in t's dtype (the samplers pass
    float64 so that their floors are exact)."""
    return torch.arccos(t.clamp(0, 1)) / (math.pi / 2)
