"""Training losses and evaluation ELBOs of the text models.

PGM: draw t, put each token in group 1 with probability 1 - alpha_t (group 1 plays the masked
tokens), predict every token from the other group in one pass, and weight group-1 tokens by
the MDLM weight at t and group-0 tokens by the weight at the complementary time (the swapped
view is a second MDLM ELBO). Training averages the two estimates; the evaluation ELBO keeps
the group-1 terms only, which is exactly MDLM's single-view ELBO.

All loss arithmetic runs in float32 with the mask logit at -inf.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from .losses import LossOutput, finish, model_config, modeled_positions, token_nll
from .schedules import LogLinearSchedule, sample_times


@dataclasses.dataclass
class Noise:
    """The randomness of one loss evaluation: a time per row and a uniform per token.

    Drawing it apart from the loss lets a distributed run draw the global batch's noise once
    and give each rank its rows, so that N processes compute what one process would.
    """

    t: torch.Tensor  # [B]
    u: torch.Tensor  # [B, L]

    def __getitem__(self, rows) -> "Noise":
        return Noise(self.t[rows], self.u[rows])

    def to(self, device) -> "Noise":
        return Noise(self.t.to(device), self.u.to(device))


def draw_noise(batch_size: int, length: int, *, antithetic: bool = True, t_min: float = 1e-3,
               generator: torch.Generator | None = None, device=None) -> Noise:
    t = sample_times(batch_size, antithetic=antithetic, t_min=t_min, generator=generator, device=device)
    return Noise(t, torch.rand(batch_size, length, generator=generator, device=device))


def sample_groups(t: torch.Tensor, shape: tuple[int, int], *, always_clean: torch.Tensor | None = None,
                  schedule: LogLinearSchedule = LogLinearSchedule(),
                  generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, L]: True = group 1 (masked), i.i.d. with probability 1 - alpha_t per row."""
    if u is None:
        u = torch.rand(shape, generator=generator, device=t.device)
    groups = u < (1 - schedule.alpha(t))[:, None]
    if always_clean is not None:
        groups = groups & ~always_clean.bool()
    return groups


@dataclasses.dataclass
class _DiffusionObjective:
    schedule: LogLinearSchedule = dataclasses.field(default_factory=LogLinearSchedule)
    antithetic: bool = True
    t_min: float = 1e-3

    def draw_noise(self, batch_size: int, length: int, generator=None, device=None) -> Noise:
        return draw_noise(batch_size, length, antithetic=self.antithetic, t_min=self.t_min, generator=generator,
                          device=device)

    def _partition(self, tokens, always_clean, generator, noise):
        if noise is None:
            noise = self.draw_noise(*tokens.shape, generator=generator, device=tokens.device)
        groups = sample_groups(noise.t, tokens.shape, always_clean=always_clean, schedule=self.schedule, u=noise.u)
        return noise.t, groups


@dataclasses.dataclass
class PartitionObjective(_DiffusionObjective):
    """PGM training loss and ELBO. `complement` picks the swapped view's time: "exact" solves
    1 - alpha_s = alpha_t; "one_minus_t" is the reference implementation's literal 1 - t."""

    complement: Literal["exact", "one_minus_t"] = "exact"

    def _forward(self, model, tokens, always_clean, generator, noise):
        t, groups = self._partition(tokens, always_clean, generator, noise)
        cond = self.schedule.sigma(t) if model_config(model).time_conditioning else None
        logits = model(tokens, groups, cond, check_inputs=False)
        return t, groups, token_nll(logits, tokens, model_config(model).mask_token_id)

    def loss(self, model, tokens: torch.Tensor, valid: torch.Tensor | None = None,
             always_clean: torch.Tensor | None = None, generator: torch.Generator | None = None,
             noise: Noise | None = None) -> LossOutput:
        t, groups, nll = self._forward(model, tokens, always_clean, generator, noise)
        s = self.schedule.complement(t) if self.complement == "exact" else 1 - t
        weight = self.schedule.weight(t)[:, None]
        weights = torch.where(groups, weight, self.schedule.weight(s)[:, None])
        if always_clean is not None:
            # A row given more than its BOS (a prompt) is modeled given it: the swapped view would
            # predict the response from the group without the prompt, so its half goes to the view
            # that sees the prompt.
            prompted = always_clean[:, 1:].any(1, keepdim=True)
            weights = torch.where(prompted, torch.where(groups, 2 * weight, 0.0), weights)
        return finish(weights * nll, modeled_positions(tokens, valid, always_clean), scale=0.5)

    def elbo(self, model, tokens: torch.Tensor, valid: torch.Tensor | None = None,
             always_clean: torch.Tensor | None = None, generator: torch.Generator | None = None,
             noise: Noise | None = None) -> LossOutput:
        t, groups, nll = self._forward(model, tokens, always_clean, generator, noise)
        per_token = torch.where(groups, self.schedule.weight(t)[:, None] * nll, 0.0)
        return finish(per_token, modeled_positions(tokens, valid, always_clean))


@dataclasses.dataclass
class MaskedDiffusionObjective(_DiffusionObjective):
    """MDLM: mask each token with probability 1 - alpha_t, weight masked tokens' NLL by 1/t."""

    def loss(self, model, tokens: torch.Tensor, valid: torch.Tensor | None = None,
             always_clean: torch.Tensor | None = None, generator: torch.Generator | None = None,
             noise: Noise | None = None) -> LossOutput:
        t, masked = self._partition(tokens, always_clean, generator, noise)
        noisy = torch.where(masked, model_config(model).mask_token_id, tokens)
        cond = self.schedule.sigma(t) if model_config(model).time_conditioning else None
        nll = token_nll(model(noisy, cond, check_inputs=False), tokens, model_config(model).mask_token_id)
        per_token = torch.where(masked, self.schedule.weight(t)[:, None] * nll, 0.0)
        return finish(per_token, modeled_positions(tokens, valid, always_clean))

    elbo = loss


@dataclasses.dataclass
class AutoregressiveObjective:
    """Next-token cross-entropy: position i predicts token i + 1. Its `elbo` is the exact NLL."""

    def draw_noise(self, batch_size: int, length: int, generator=None, device=None) -> None:
        return None  # nothing random in the loss

    def loss(self, model, tokens: torch.Tensor, valid: torch.Tensor | None = None,
             always_clean: torch.Tensor | None = None, generator: torch.Generator | None = None,
             noise=None) -> LossOutput:
        logits = model(tokens[:, :-1], check_inputs=False)
        nll = token_nll(logits, tokens[:, 1:], model_config(model).mask_token_id)
        modeled = modeled_positions(tokens, valid, always_clean)[:, 1:]
        return finish(nll, modeled)

    elbo = loss
