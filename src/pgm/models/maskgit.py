"""The Halton-MaskGIT baseline: a class-conditional bidirectional transformer over VQ codes.

Module names, shapes and numerics follow the released "large" checkpoint
(`maskgit_100epochs.ckpt`, see docs/reference image-stack.md §2): learned absolute positions,
register tokens appended after the grid, adaLN blocks driven by a class embedding, RMSNorm in
float32, QK-norm over the full width, SwiGLU feed-forwards and an output head tied to the token
embedding.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, require
from ..errors import ArgumentError
from .base import PretrainedModel, check_attention_shape, check_ids
from .layers import Conditioning, merge_heads, modulate, modulations, split_heads, zero_init_

RMS_EPS = 1e-5
FFN_MULTIPLE = 256


@dataclasses.dataclass
class MaskGITConfig(ModelConfig):
    """Shape of a `MaskGITTransformer`; the defaults are the released large model (480M)."""

    kind: ClassVar[str] = "maskgit"

    codebook_size: int = 16384
    grid_size: int = 32
    hidden_size: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    num_classes: int = 1000
    registers: int = 1
    dropout: float = 0.1

    @property
    def vocab_size(self) -> int:
        """The codes plus the mask id."""
        return self.codebook_size + 1

    @property
    def mask_token_id(self) -> int:
        return self.codebook_size

    @property
    def length(self) -> int:
        """Code positions per image (the grid read row-major)."""
        return self.grid_size ** 2

    @property
    def null_class(self) -> int:
        """The label of classifier-free guidance's unconditional branch."""
        return self.num_classes

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden size: 2/3 of `mlp_dim`, rounded up to a multiple of 256 (4096 -> 2816)."""
        return -(-(2 * self.mlp_dim // 3) // FFN_MULTIPLE) * FFN_MULTIPLE

    def validate(self) -> None:
        for name in ("codebook_size", "grid_size", "depth", "num_heads", "mlp_dim", "num_classes"):
            require(getattr(self, name) >= 1, f"{name} must be positive, got {getattr(self, name)}")
        check_attention_shape(self)
        require(self.registers >= 0, f"registers must be zero or more, got {self.registers}")


def rms_norm(x: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """`x * rsqrt(mean(x^2) + eps)` over the last dimension, computed in float32, in x's dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """`rms_norm` scaled by a weight, and shifted by a bias if `bias`."""

    def __init__(self, dim: int, bias: bool = False, eps: float = RMS_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_parameter("bias", nn.Parameter(torch.zeros(dim)) if bias else None)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_norm(x, self.eps) * self.weight
        return x if self.bias is None else x + self.bias


class Attention(nn.Module):
    """Self-attention without biases; q and k are RMS-normalised over the full width before the
    head split, as the checkpoint was trained (not per head)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.wq = nn.Linear(hidden_size, hidden_size, bias=False)
        self.wk = nn.Linear(hidden_size, hidden_size, bias=False)
        self.wv = nn.Linear(hidden_size, hidden_size, bias=False)
        self.wo = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, L, H] -> [B, L, H]
        v = self.wv(x)
        q, k = (rms_norm(proj(x)).to(v.dtype) for proj in (self.wq, self.wk))
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))  # [B, heads, L, d]
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return F.dropout(self.wo(merge_heads(out)), self.dropout, self.training)


class FeedForward(nn.Module):
    """SwiGLU without biases: `w2(dropout(silu(w1 x) * w3 x))`."""

    def __init__(self, hidden_size: int, ffn_hidden: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.w1 = nn.Linear(hidden_size, ffn_hidden, bias=False)
        self.w2 = nn.Linear(ffn_hidden, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.dropout(F.silu(self.w1(x)) * self.w3(x), self.dropout, self.training))


class MaskGITBlock(nn.Module):
    """adaLN block: `mlp` maps the class vector to shift/scale/gate for attention, then for the FFN."""

    def __init__(self, hidden_size: int, num_heads: int, ffn_hidden: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.ln1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, dropout)
        self.ln2 = RMSNorm(hidden_size)
        self.ff = FeedForward(hidden_size, ffn_hidden, dropout)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x [B, L, H]; cond [B, H]; the modulations broadcast over the sequence.
        shift1, scale1, gate1, shift2, scale2, gate2 = modulations(self.mlp, cond)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.ln1(x), shift1, scale1))
        return x + gate2 * self.ff(modulate(self.ln2(x), shift2, scale2))


class AdaptiveFinalNorm(nn.Module):
    """`norm_final(x) * (1 + scale) + shift`, with (shift, scale) = mlp(cond)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size, bias=True)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = modulations(self.mlp, cond)[:, None].chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)


class MaskGITTransformer(PretrainedModel):
    """Halton-MaskGIT's transformer: logits over the codebook (and the mask id) at every grid cell,
    conditioned on a class label. The module tree reproduces the released state_dict key for key."""

    config_class = MaskGITConfig

    def __init__(self, config: MaskGITConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.cls_emb = nn.Embedding(config.num_classes + 1, hidden)
        self.tok_emb = nn.Embedding(config.vocab_size, hidden)
        self.pos_emb = nn.Embedding(config.length, hidden)
        self.transformer = nn.ModuleDict({"layers": nn.ModuleList(
            MaskGITBlock(hidden, config.num_heads, config.ffn_hidden, config.dropout) for _ in range(config.depth))})
        self.last_norm = AdaptiveFinalNorm(hidden)
        self.head = nn.Linear(hidden, config.vocab_size)
        self.head.weight = self.tok_emb.weight
        if config.registers:
            self.reg_tokens = nn.Embedding(config.registers, hidden)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-uniform linears with zero biases, N(0, 0.02) embeddings (the tied head included),
        and zeroed block modulations, so that every block starts as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.head:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        for layer in self.transformer.layers:
            zero_init_(layer.mlp[1])

    def forward(self, codes: torch.Tensor, labels: torch.Tensor, *, check_inputs: bool = True) -> torch.Tensor:
        """Logits [B, N, vocab_size] for codes [B, N] (`mask_token_id` where unknown, N = grid_size**2)
        and labels [B] in [0, num_classes], where `num_classes` is the null (unconditional) class.
        The mask id is not excluded from the logits."""
        if check_inputs:
            self._check_inputs(codes, labels)
        batch, length = codes.shape
        cond = labels if isinstance(labels, Conditioning) else self.cls_emb(labels)  # [B, H]
        x = self.tok_emb(codes) + self.pos_emb.weight  # [B, N, H]
        if self.config.registers:
            # Registers go after the grid and carry no position.
            x = torch.cat([x, self.reg_tokens.weight.expand(batch, -1, -1)], dim=1)  # [B, N + R, H]
        for layer in self.transformer.layers:
            x = layer(x, cond)
        return self.head(self.last_norm(x[:, :length], cond))

    def condition(self, labels: torch.Tensor, batch_size: int) -> Conditioning:
        """Labels ([B] or one for all) as a `Conditioning`: passed as `labels` at every sampling
        step, their modulations are computed once."""
        return Conditioning(self.cls_emb(labels.reshape(-1).expand(batch_size)))

    def _check_inputs(self, codes: torch.Tensor, labels: torch.Tensor) -> None:
        check_ids("codes", codes, self.config.vocab_size, what="code")
        if codes.shape[1] != self.config.length:
            raise ArgumentError(f"codes must hold {self.config.length} positions (a {self.config.grid_size}x"
                                f"{self.config.grid_size} grid read row-major), got {codes.shape[1]}")
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ArgumentError(f"labels must be an integer tensor, got {type(labels).__name__} "
                                f"{getattr(labels, 'dtype', '')}".rstrip())
        if labels.shape != codes.shape[:1]:
            raise ArgumentError(f"labels must have shape [batch] = ({codes.shape[0]},), got {tuple(labels.shape)}")
        check_ids("labels", labels[None], self.config.num_classes + 1, what="class label")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's load that keeps the head tied to the token embedding. `head.weight` may be
        absent (files that store a shared tensor once); if present it must equal `tok_emb.weight`."""
        metadata = getattr(state_dict, "_metadata", None)
        state_dict = OrderedDict(state_dict)
        if metadata is not None:
            state_dict._metadata = metadata
        head = state_dict.pop("head.weight", None)
        embedding = state_dict.setdefault("tok_emb.weight", head)
        if embedding is None:
            del state_dict["tok_emb.weight"]
        else:
            if head is not None and head is not embedding and not head.is_meta and not embedding.is_meta \
                    and not torch.equal(head, embedding):
                raise ArgumentError("head.weight differs from tok_emb.weight, but the model ties them")
            state_dict["head.weight"] = embedding
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        # assign=True rebinds each name to its own new Parameter: tie them again.
        self.head.weight = self.tok_emb.weight
        return result
