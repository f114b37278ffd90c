"""What every token model shares: input checks and the adaLN conditioning vector."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .layers import Conditioning


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


class PretrainedModel(nn.Module):
    """What every model class shares: a JSON-able `config`, save/load as a pretrained directory."""

    config: object

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

    def savable_state(self, state: dict | None = None) -> dict:
        """`state` (default: this model's state_dict) without the aliases of tied weights (MaskGIT's
        head.weight is tok_emb.weight): safetensors stores each tensor once, and loading re-ties."""
        state = self.state_dict() if state is None else state
        own = {name for name, _ in self.named_parameters()} | {name for name, _ in self.named_buffers()}
        return {name: value for name, value in state.items() if name in own}

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class TimeConditionedModel(PretrainedModel):
    """Holds `sigma_map` and turns `cond` into the adaLN vector SiLU(sigma_map(sigma)), or, for a
    class-conditional model, holds `cls_embed` and turns class labels into the adaLN vector.

    Models trained without time conditioning still pass sigma = 0 through `sigma_map`, as the
    released checkpoints do, so its weights shape every modulation.
    """

    config: object
    sigma_map: nn.Module

    def condition(self, cond: torch.Tensor | None, batch_size: int) -> Conditioning:
        """`cond` as a `Conditioning`: passed as `cond` at every sampling step, its modulations are
        computed once."""
        return Conditioning(self.conditioning(cond, batch_size))

    def conditioning(self, cond: torch.Tensor | Conditioning | None, batch_size: int) -> torch.Tensor | Conditioning:
        if isinstance(cond, Conditioning):
            return cond
        if getattr(self.config, "num_classes", 0):
            # Class-conditional: the class embedding itself is the adaLN input (no SiLU), as in
            # the authors' image model; label num_classes is the null class of guidance.
            labels = torch.as_tensor(cond, device=self.cls_embed.embedding_table.weight.device).long().reshape(-1)
            return self.cls_embed(labels.expand(batch_size) if labels.numel() == 1 else labels)
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


def check_labels(cond, batch_size: int, num_classes: int) -> None:
    """`cond` must hold one class label per row (or one for all) in [0, num_classes]; num_classes
    itself is the null class."""
    if cond is None:
        raise ValueError(f"this model is class-conditional: pass cond, class labels in [0, {num_classes}] "
                         f"({num_classes} = no class)")
    labels = torch.as_tensor(cond)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.numel() not in (1, batch_size):
        raise ValueError(f"cond must be an integer tensor of {batch_size} class labels, got {tuple(labels.shape)} "
                         f"{labels.dtype}")
    if bool((labels < 0).any()) or bool((labels > num_classes).any()):
        raise ValueError(f"class labels must lie in [0, {num_classes}] ({num_classes} = no class), got "
                         f"{labels.min().item()}..{labels.max().item()}")
