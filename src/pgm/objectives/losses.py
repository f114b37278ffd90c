"""The loss pieces every objective shares: the per-token NLL in float32 with the mask logit
removed, which positions are scored, and the reduction to a `LossOutput`."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class LossOutput:
    """`loss` is what to backpropagate; `nll_sum / tokens` is the per-token ELBO (nats);
    `row_nll` and `row_tokens` [B] break both down by row."""

    loss: torch.Tensor
    nll_sum: torch.Tensor
    tokens: torch.Tensor
    row_nll: torch.Tensor
    row_tokens: torch.Tensor


def model_config(model):
    """The config of a model, also through a DistributedDataParallel wrapper."""
    return getattr(model, "module", model).config


def token_nll(logits: torch.Tensor, targets: torch.Tensor, suppressed_id: int) -> torch.Tensor:
    """-log p(target) [B, L] in float32, with the `suppressed_id` logit removed from the softmax."""
    if logits.dtype == torch.float32:
        logits = logits.index_fill(-1, torch.tensor([suppressed_id], device=logits.device), float("-inf"))
    else:
        logits = logits.float().index_fill_(-1, torch.tensor([suppressed_id], device=logits.device), float("-inf"))
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view_as(targets)


def always_clean_mask(tokens: torch.Tensor, given: torch.Tensor | None, bos_always_clean: bool) -> torch.Tensor | None:
    """Bool [B, L]: the positions a row is given, never masked, hidden or scored: its first given[b]
    tokens (the BOS and prompt of a pair), and the BOS when `bos_always_clean`; None when none is."""
    if given is None and not bos_always_clean:
        return None
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
    if given is None:
        given = torch.zeros(len(tokens), dtype=torch.long)
    return positions < given.to(tokens.device).clamp(min=int(bos_always_clean))[:, None]


def modeled_positions(tokens: torch.Tensor, valid: torch.Tensor | None, always_clean: torch.Tensor | None) -> torch.Tensor:
    """Tokens whose likelihood is modeled: valid (not padding) and not given (like BOS)."""
    modeled = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid.bool()
    if always_clean is not None:
        modeled = modeled & ~always_clean.bool()
    return modeled


def finish(per_token: torch.Tensor, modeled: torch.Tensor, scale: float = 1.0) -> LossOutput:
    row_nll = (per_token * modeled).sum(1) * scale
    row_tokens = modeled.sum(1)
    count = row_tokens.sum()
    nll_sum = row_nll.sum()
    return LossOutput(loss=nll_sum / count.clamp(min=1), nll_sum=nll_sum.detach(), tokens=count,
                      row_nll=row_nll.detach(), row_tokens=row_tokens)
