"""What every token model shares: input checks and the adaLN conditioning vector."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def check_ids(name: str, ids: torch.Tensor, upper: int, *, what: str = "token id") -> None:
    """`ids` must be an integer [B, N] tensor with values in [0, upper)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {type(ids).__name__} {getattr(ids, 'dtype', '')}".rstrip())
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape [batch, length], got {tuple(ids.shape)}")
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= upper:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds the {what} {bad}, outside [0, {upper})")


class TimeConditionedModel(nn.Module):
    """Holds `sigma_map` and turns `cond` into the adaLN vector SiLU(sigma_map(sigma)).

    Models trained without time conditioning still pass sigma = 0 through `sigma_map`, as the
    released checkpoints do, so its weights shape every modulation.
    """

    config: object
    sigma_map: nn.Module

    def conditioning(self, cond: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        device = self.sigma_map.mlp[0].weight.device
        if self.config.time_conditioning:
            if cond is None:
                raise ValueError("this model is time-conditioned: pass cond, a [batch] tensor of noise levels sigma")
            sigma = torch.as_tensor(cond, device=device).float().reshape(-1)
            if sigma.numel() == 1:
                sigma = sigma.expand(batch_size)
            if sigma.shape[0] != batch_size:
                raise ValueError(f"cond has {sigma.shape[0]} noise levels for a batch of {batch_size}")
        else:
            if cond is not None:
                raise ValueError("this model is not time-conditioned: cond must be None")
            sigma = torch.zeros(1, device=device)
        return F.silu(self.sigma_map(sigma))

    def save_pretrained(self, directory, tokenizer=None):
        """Write config.json + model.safetensors (+ tokenizer/) into `directory`."""
        from ..hub import save_pretrained

        return save_pretrained(self, directory, tokenizer)

    @classmethod
    def from_pretrained(cls, name_or_path, **options):
        """Load a pretrained or run directory, an authors' checkpoint, or a Hub id (see pgm.hub)."""
        from ..hub import from_pretrained

        model = from_pretrained(name_or_path, **options)
        if not isinstance(model, cls):
            raise ValueError(f"{name_or_path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
