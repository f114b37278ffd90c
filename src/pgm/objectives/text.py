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
import torch.nn.functional as F

from .schedules import LogLinearSchedule, sample_times


@dataclasses.dataclass
class LossOutput:
    """`loss` is what to backpropagate; `nll_sum / tokens` is the per-token ELBO (nats)."""

    loss: torch.Tensor
    nll_sum: torch.Tensor
    tokens: torch.Tensor


def token_nll(logits: torch.Tensor, targets: torch.Tensor, suppressed_id: int) -> torch.Tensor:
    """-log p(target) [B, L] in float32, with the `suppressed_id` logit removed from the softmax."""
    if logits.dtype == torch.float32:
        logits = logits.index_fill(-1, torch.tensor([suppressed_id], device=logits.device), float("-inf"))
    else:
        logits = logits.float().index_fill_(-1, torch.tensor([suppressed_id], device=logits.device), float("-inf"))
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view_as(targets)


def _modeled(tokens: torch.Tensor, valid: torch.Tensor | None, always_clean: torch.Tensor | None) -> torch.Tensor:
    """Tokens whose likelihood is modeled: valid (not padding) and not given (like BOS)."""
    modeled = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid.bool()
    if always_clean is not None:
        modeled = modeled & ~always_clean.bool()
    return modeled


def _finish(per_token: torch.Tensor, modeled: torch.Tensor, scale: float = 1.0) -> LossOutput:
    count = modeled.sum()
    nll_sum = (per_token * modeled).sum()
    loss = scale * nll_sum / count.clamp(min=1)
    return LossOutput(loss=loss, nll_sum=nll_sum.detach() * scale, tokens=count)


def sample_groups(t: torch.Tensor, shape: tuple[int, int], *, always_clean: torch.Tensor | None = None,
                  schedule: LogLinearSchedule = LogLinearSchedule(),
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool [B, L]: True = group 1, drawn i.i.d. with probability 1 - alpha_t per row."""
    u = torch.rand(shape, generator=generator, device=t.device)
    groups = u < (1 - schedule.alpha(t))[:, None]
    if always_clean is not None:
        groups = groups & ~always_clean.bool()
    return groups


@dataclasses.dataclass
class PartitionObjective:
    """PGM training loss and ELBO. `complement` picks the swapped view's time: "exact" solves
    1 - alpha_s = alpha_t; "one_minus_t" is the reference implementation's literal 1 - t."""

    schedule: LogLinearSchedule = dataclasses.field(default_factory=LogLinearSchedule)
    antithetic: bool = True
    t_min: float = 1e-3
    complement: Literal["exact", "one_minus_t"] = "exact"

    def _forward(self, model, tokens, always_clean, generator, t=None):
        if t is None:
            t = sample_times(tokens.shape[0], antithetic=self.antithetic, t_min=self.t_min,
                             generator=generator, device=tokens.device)
        groups = sample_groups(t, tokens.shape, always_clean=always_clean, schedule=self.schedule,
                               generator=generator)
        cond = self.schedule.sigma(t) if model.config.time_conditioning else None
        logits = model(tokens, groups, cond, check_inputs=False)
        return t, groups, token_nll(logits, tokens, model.config.mask_token_id)

    def loss(self, model, tokens: torch.Tensor, valid: torch.Tensor | None = None,
             always_clean: torch.Tensor | None = None, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None) -> LossOutput:
        t, groups, nll = self._forward(model, tokens, always_clean, generator, t)
        s = self.schedule.complement(t) if self.complement == "exact" else 1 - t
        weights = torch.where(groups, self.schedule.weight(t)[:, None], self.schedule.weight(s)[:, None])
        return _finish(weights * nll, _modeled(tokens, valid, always_clean), scale=0.5)

    def elbo(self, model, tokens: torch.Tensor, valid: torch.Tensor | None = None,
             always_clean: torch.Tensor | None = None, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None) -> LossOutput:
        t, groups, nll = self._forward(model, tokens, always_clean, generator, t)
        per_token = torch.where(groups, self.schedule.weight(t)[:, None] * nll, 0.0)
        return _finish(per_token, _modeled(tokens, valid, always_clean))


@dataclasses.dataclass
class MaskedDiffusionObjective:
    """MDLM: mask each token with probability 1 - alpha_t, weight masked tokens' NLL by 1/t."""

    schedule: LogLinearSchedule = dataclasses.field(default_factory=LogLinearSchedule)
    antithetic: bool = True
    t_min: float = 1e-3

    def loss(self, model, tokens: torch.Tensor, valid: torch.Tensor | None = None,
             always_clean: torch.Tensor | None = None, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None) -> LossOutput:
        if t is None:
            t = sample_times(tokens.shape[0], antithetic=self.antithetic, t_min=self.t_min,
                             generator=generator, device=tokens.device)
        masked = sample_groups(t, tokens.shape, always_clean=always_clean, schedule=self.schedule,
                               generator=generator)
        noisy = torch.where(masked, model.config.mask_token_id, tokens)
        cond = self.schedule.sigma(t) if model.config.time_conditioning else None
        nll = token_nll(model(noisy, cond, check_inputs=False), tokens, model.config.mask_token_id)
        per_token = torch.where(masked, self.schedule.weight(t)[:, None] * nll, 0.0)
        return _finish(per_token, _modeled(tokens, valid, always_clean))

    elbo = loss


def objective_for(model, **options):
    """The objective that trains `model`'s kind."""
    kind = model.config.kind
    if kind == "pgm":
        return PartitionObjective(**options)
    if kind == "mdlm":
        return MaskedDiffusionObjective(**options)
    raise ValueError(f"no text objective for model kind {kind!r}")
