"""The MDLM baseline: a bidirectional DiT over the full sequence, `[MASK]` tokens included."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..config import require
from ..errors import ArgumentError
from .base import TimeConditionedModel, TokenTransformerConfig, check_ids
from .layers import FinalLayer, Rotary, SelfAttentionBlock, TimestepEmbedder, TokenEmbedding


@dataclasses.dataclass
class MaskedDiffusionConfig(TokenTransformerConfig):
    """Shape and options of a `MaskedDiffusionTransformer`."""

    kind: ClassVar[str] = "mdlm"

    blocks: int = 12

    def validate(self) -> None:
        super().validate()
        require(self.blocks >= 1, f"blocks must be positive, got {self.blocks}")


class SelfAttentionStack(TimeConditionedModel):
    """The DiT module tree (the authors' names): token embedding, sigma_map, rotary, a stack of
    adaLN self-attention blocks and the output layer. MDLM and the AR baseline share it, so at
    equal shapes they have exactly the same parameters."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vocab_embed = TokenEmbedding(config.vocab_size, config.hidden_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary_emb = Rotary(config.hidden_size // config.num_heads)
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(config.hidden_size, config.num_heads, config.cond_dim, config.mlp_ratio, config.dropout)
            for _ in range(config.blocks))
        self.output_layer = FinalLayer(config.hidden_size, config.vocab_size, config.cond_dim)


class MaskedDiffusionTransformer(SelfAttentionStack):
    """DiT backbone of MDLM: every position, masked or not, goes through every block."""

    config_class = MaskedDiffusionConfig

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor | None = None, *,
                lengths: torch.Tensor | None = None, check_inputs: bool = True) -> torch.Tensor:
        """Logits [B, L, V] for tokens [B, L] in which unknown positions hold `mask_token_id`.
        `lengths` [B]: rows are right-padded to L and only their first lengths[b] tokens are
        attended to (the logits at padded positions mean nothing)."""
        hidden, cond_vector = self.encode(tokens, cond, lengths=lengths, check_inputs=check_inputs)
        return self.output_layer(hidden, cond_vector)

    def encode(self, tokens: torch.Tensor, cond: torch.Tensor | None = None, *,
               lengths: torch.Tensor | None = None, check_inputs: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's states [B, L, H] and the conditioning vector [1 or B, C]."""
        batch, length = tokens.shape
        if check_inputs:
            check_ids("tokens", tokens, self.config.vocab_size)
            if length > self.config.length:
                raise ArgumentError(f"tokens have length {length}, longer than the model's length {self.config.length}")
            if lengths is not None and (lengths.shape != (batch,) or bool((lengths < 1).any())
                                        or bool((lengths > length).any())):
                raise ArgumentError(f"lengths must be [{batch}] integers in [1, {length}], got {lengths.tolist()}")
        cond_vector = self.conditioning(cond, batch)
        rope = self.rotary_emb(torch.arange(length, device=tokens.device))
        mask = None
        if lengths is not None:
            mask = (torch.arange(length, device=tokens.device) < lengths[:, None])[:, None, None, :]
        x = self.vocab_embed(tokens)
        for block in self.blocks:
            x = block(x, cond_vector, rope, mask)
        return x, cond_vector

    def logits_at(self, hidden: torch.Tensor, cond_vector: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        """Logits [n, V] only at the positions where `select` [B, L] is True."""
        rows = select.nonzero()[:, 0]
        cond_rows = cond_vector.expand(hidden.shape[0], -1)[rows]
        return self.output_layer(hidden[select][:, None], cond_rows)[:, 0]
