"""The autoregressive baseline: a causal transformer built from the same adaLN blocks.

Its conditioning vector is the constant SiLU(sigma_map(0)) of the diffusion models, so that at
equal shapes it has exactly MDLM's parameters. Generation uses a key/value cache: each new
token costs one pass over one position.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..config import require
from ..errors import ArgumentError
from .base import TokenTransformerConfig, check_ids
from .dit import SelfAttentionStack
from .layers import LayerCache


@dataclasses.dataclass
class CausalConfig(TokenTransformerConfig):
    """Shape of a `CausalTransformer`. `mask_token_id` is unused by the model (it never sees a
    mask) but kept so the vocabulary matches the diffusion models' and is never sampled."""

    kind: ClassVar[str] = "ar"

    blocks: int = 12

    def validate(self) -> None:
        super().validate()
        require(not self.time_conditioning, "the autoregressive baseline has no noise level: time_conditioning "
                                            "must be false")
        require(self.blocks >= 1, f"blocks must be positive, got {self.blocks}")


class KVCache:
    """Keys and values of every block for the positions processed so far."""

    def __init__(self, num_blocks: int, capacity: int):
        self.layers = [LayerCache(capacity) for _ in range(num_blocks)]

    @property
    def filled(self) -> int:
        return self.layers[0].filled


class CausalTransformer(SelfAttentionStack):
    config_class = CausalConfig

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor | None = None, *, check_inputs: bool = True,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, L, V]: position i predicts token i + 1. With `cache`, `tokens` continue the
        cached positions and their keys/values are appended to it."""
        batch, length = tokens.shape
        start = cache.filled if cache is not None else 0
        if check_inputs:
            check_ids("tokens", tokens, self.config.vocab_size)
            if start + length > self.config.length:
                raise ArgumentError(f"{start + length} positions exceed the model's length {self.config.length}")
        cond_vector = self.conditioning(cond, batch)
        rope = self.rotary_emb(torch.arange(start, start + length, device=tokens.device))
        x = self.vocab_embed(tokens)
        for index, block in enumerate(self.blocks):
            if cache is None:
                x = block(x, cond_vector, rope, causal=True)
            else:
                x = block(x, cond_vector, rope, cache=cache.layers[index])
        return self.output_layer(x, cond_vector)

    def new_cache(self, length: int) -> KVCache:
        """An empty cache for sequences of up to `length` positions."""
        return KVCache(len(self.blocks), length)
