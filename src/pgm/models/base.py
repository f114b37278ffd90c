"""What every model shares: input checks, the shape fields of the token transformers, saving as
a pretrained directory, and the adaLN conditioning vector."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, require
from ..errors import ArgumentError, CheckpointError
from ..formats import (CONFIG_FILE, MODEL_CARD, TOKENIZER_DIR, WEIGHTS_FILE, Origin, copy_directory, make_directory,
                       model_card, replaced_directory, save_weights, write_atomic, write_json)
from .layers import Conditioning


def check_ids(name: str, ids: torch.Tensor, upper: int, *, what: str = "token id") -> None:
    """`ids` must be an integer [B, N] tensor with values in [0, upper)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ArgumentError(f"{name} must be an integer tensor, got {type(ids).__name__} "
                            f"{getattr(ids, 'dtype', '')}".rstrip())
    if ids.dim() != 2:
        raise ArgumentError(f"{name} must have shape [batch, length], got {tuple(ids.shape)}")
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= upper:
            bad = low if low < 0 else high
            raise ArgumentError(f"{name} holds the {what} {bad}, outside [0, {upper})")


def load_state(model: nn.Module, state: dict) -> None:
    """`model.load_state_dict(state)`; what does not fit is a CheckpointError of one line (PyTorch's
    first mismatch), for the caller to say which file it came from."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise CheckpointError(lines[1] if len(lines) > 1 else str(error)) from None


def check_attention_shape(config) -> None:
    """Hidden size, heads (an even head dimension) and dropout: what every transformer config shares."""
    require(config.hidden_size >= 2, f"hidden_size must be at least 2, got {config.hidden_size}")
    require(config.num_heads >= 1, f"num_heads must be positive, got {config.num_heads}")
    require(config.hidden_size % config.num_heads == 0,
            f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
    require((config.hidden_size // config.num_heads) % 2 == 0,
            f"the head dimension hidden_size/num_heads = {config.hidden_size // config.num_heads} must be even")
    require(0.0 <= config.dropout < 1.0, f"dropout must be in [0, 1), got {config.dropout}")


@dataclasses.dataclass
class TokenTransformerConfig(ModelConfig):
    """The shape every token transformer of the DiT family (PGM, MDLM, AR) shares; the defaults
    are the paper's OpenWebText models. `mask_token_id` defaults to the last id."""

    vocab_size: int = 50258
    length: int = 1024
    hidden_size: int = 768
    num_heads: int = 12
    mlp_ratio: int = 4
    cond_dim: int = 128
    dropout: float = 0.1
    time_conditioning: bool = False
    mask_token_id: int | None = None

    def validate(self) -> None:
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size - 1
        require(self.vocab_size >= 2, f"vocab_size must be at least 2, got {self.vocab_size}")
        require(self.length >= 1, f"length must be positive, got {self.length}")
        check_attention_shape(self)
        require(self.mlp_ratio >= 1, f"mlp_ratio must be positive, got {self.mlp_ratio}")
        require(self.cond_dim >= 1, f"cond_dim must be positive, got {self.cond_dim}")
        require(0 <= self.mask_token_id < self.vocab_size,
                f"mask_token_id {self.mask_token_id} is outside the vocabulary of size {self.vocab_size}")


class PretrainedModel(nn.Module):
    """What every model class shares: a JSON-able `config`, and saving as a pretrained directory.

    `origin` says where a loaded model came from (set by `pgm.from_pretrained`), so that saving
    it again keeps its tokenizer and what its model card knows of its training."""

    config: object
    origin: Origin | None = None

    def save_pretrained(self, directory: str | Path, tokenizer=None, *, keep_tokenizer: bool = True,
                        repo_id: str | None = None) -> Path:
        """Write config.json, model.safetensors, the model card README.md and tokenizer/ into
        `directory`: `tokenizer` when given, else the tokenizer this model was loaded with (none
        with `keep_tokenizer=False`). `repo_id`: the Hub repository the directory is written for,
        which the card loads it from. Every file, and the tokenizer directory, is replaced atomically."""
        directory = Path(directory)
        make_directory(directory)
        origin = self.origin or Origin(source="")
        values = {"model": self.config.to_dict()}
        target = directory / TOKENIZER_DIR
        if tokenizer is not None:
            with replaced_directory(target) as temporary:
                tokenizer.save(temporary)
        elif not keep_tokenizer:
            pass
        elif origin.tokenizer_dir is not None and origin.tokenizer_dir.resolve() != target.resolve():
            copy_directory(origin.tokenizer_dir, target)
        elif origin.tokenizer_name:
            values["tokenizer"] = origin.tokenizer_name
        if origin.card:
            values["card"] = origin.card
        save_weights(self.savable_state(), directory / WEIGHTS_FILE)
        write_json(directory / CONFIG_FILE, values)
        write_atomic(directory / MODEL_CARD,
                     model_card(self.config.to_dict(), self.num_parameters(), origin.card, repo_id).encode())
        return directory

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
                raise ArgumentError("this model is time-conditioned: pass cond, a [batch] tensor of noise levels sigma")
            sigma = torch.as_tensor(cond, device=device).float().reshape(-1)
            if sigma.numel() == 1:
                sigma = sigma.expand(batch_size)
            if sigma.shape[0] != batch_size:
                raise ArgumentError(f"cond has {sigma.shape[0]} noise levels for a batch of {batch_size}")
        else:
            if cond is not None:
                raise ArgumentError("this model is not time-conditioned: cond must be None")
            sigma = torch.zeros(1, device=device)
        return F.silu(self.sigma_map(sigma))


def check_labels(cond, batch_size: int, num_classes: int) -> None:
    """`cond` must hold one class label per row (or one for all) in [0, num_classes]; num_classes
    itself is the null class."""
    if cond is None:
        raise ArgumentError(f"this model is class-conditional: pass cond, class labels in [0, {num_classes}] "
                            f"({num_classes} = no class)")
    labels = torch.as_tensor(cond)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.numel() not in (1, batch_size):
        raise ArgumentError(f"cond must be an integer tensor of {batch_size} class labels, got {tuple(labels.shape)} "
                            f"{labels.dtype}")
    if bool((labels < 0).any()) or bool((labels > num_classes).any()):
        raise ArgumentError(f"class labels must lie in [0, {num_classes}] ({num_classes} = no class), got "
                            f"{labels.min().item()}..{labels.max().item()}")
