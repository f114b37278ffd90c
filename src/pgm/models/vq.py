"""A VQ image tokenizer with LlamaGen's module tree and parameter names, so that LlamaGen's
released VQ checkpoints (VQ-8: `vq_ds8_c2i.pt`) load into it strictly (`pgm.importers.llamagen`).

    image [B, C, H, W] in [-1, 1]
      ─encoder─> [B, z_channels, h, w] ─quant_conv─> [B, codebook_dim, h, w]
      ─quantize (nearest L2-normalised codebook row)─> codes [B, h*w], row-major p = row*w + col
      ─codebook rows─> [B, codebook_dim, h, w] ─post_quant_conv─> ─decoder─> image [B, C, H, W]

The encoder halves the resolution after every level but the last; the decoder mirrors it with
nearest-neighbour upsampling. Single-head attention appears only at the deepest level and in
the middle blocks. The decoder output is not clamped: callers clamp to [-1, 1].
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, require
from ..errors import ArgumentError
from .base import PretrainedModel, check_ids

# Rows of latents compared with the whole codebook at once: bounds the [rows, codebook_size]
# distance matrix (VQ-8 encodes 1024 latents per image against 16384 codes).
DISTANCE_CHUNK_ROWS = 4096


@dataclasses.dataclass
class VQConfig(ModelConfig):
    """Shape of a `VQModel`. The defaults are LlamaGen's VQ-8 (70,109,835 parameters)."""

    kind: ClassVar[str] = "vq"

    in_channels: int = 3
    image_size: int = 256
    channels: int = 128
    channel_multipliers: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 2, 4])
    encoder_res_blocks: int = 2
    decoder_res_blocks: int = 3
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_dim: int = 8
    norm_groups: int = 32
    dropout: float = 0.0
    commitment: float = 0.25
    codebook_usage_window: int = 65536

    def validate(self) -> None:
        positive = ("in_channels", "image_size", "channels", "encoder_res_blocks", "decoder_res_blocks", "z_channels",
                    "codebook_size", "codebook_dim", "norm_groups", "codebook_usage_window")
        for name in positive:
            require(getattr(self, name) >= 1, f"{name} must be positive, got {getattr(self, name)}")
        require(len(self.channel_multipliers) >= 1, "channel_multipliers must name at least one level")
        require(all(m >= 1 for m in self.channel_multipliers),
                f"channel_multipliers must be positive, got {self.channel_multipliers}")
        for multiplier in self.channel_multipliers:
            width = self.channels * multiplier
            require(width % self.norm_groups == 0,
                    f"channels*multiplier = {width} is not divisible by norm_groups {self.norm_groups}")
        factor = self.downsampling_factor
        require(self.image_size % factor == 0,
                f"image_size {self.image_size} is not divisible by the downsampling factor {factor}")
        require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        require(self.commitment >= 0.0, f"commitment must be non-negative, got {self.commitment}")

    @property
    def downsampling_factor(self) -> int:
        """Image pixels per latent cell along each side: every level but the last halves the size."""
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsampling_factor

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def length(self) -> int:
        """Values in one training row: the image's pixels."""
        return self.in_channels * self.image_size ** 2


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus a skip that is the
    identity, or a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions with 1x1-conv projections, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def positions_last(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, H*W, C]
            return t.flatten(2).transpose(1, 2)

        # The default scale of scaled_dot_product_attention is C^-1/2, the block's scale.
        out = F.scaled_dot_product_attention(positions_last(self.q(h)), positions_last(self.k(h)),
                                             positions_last(self.v(h)))
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution: zero-pad one pixel on the right and bottom, then a stride-2 conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour interpolation, then a conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


RESAMPLERS = {"downsample": Downsample, "upsample": Upsample}


class ConvLevel(nn.Module):
    """One resolution level: res blocks (`widths` = their (in, out) channels), each followed by
    the attention block of the same index when the level has attention, then an optional
    resampler registered under its LlamaGen name, `downsample` or `upsample`."""

    def __init__(self, widths: list[tuple[int, int]], with_attention: bool, resample: str | None, config: VQConfig):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(cin, cout, config.norm_groups, config.dropout) for cin, cout in widths)
        self.attn = nn.ModuleList(AttnBlock(cout, config.norm_groups) for _, cout in widths if with_attention)
        self.resample = resample
        if resample is not None:
            self.add_module(resample, RESAMPLERS[resample](widths[-1][1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[index](x)
        if self.resample is not None:
            x = getattr(self, self.resample)(x)
        return x


def middle(channels: int, config: VQConfig) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, config.norm_groups, config.dropout),
                          AttnBlock(channels, config.norm_groups),
                          ResnetBlock(channels, channels, config.norm_groups, config.dropout)])


class Encoder(nn.Module):
    """[B, in_channels, H, W] -> [B, z_channels, H/f, W/f] with f = 2^(levels-1)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        widths = [config.channels * m for m in config.channel_multipliers]
        levels = len(widths)
        self.conv_in = nn.Conv2d(config.in_channels, config.channels, 3, padding=1)
        blocks = []
        width_in = config.channels
        for level, width in enumerate(widths):
            deepest = level == levels - 1
            res_widths = [(width_in, width)] + [(width, width)] * (config.encoder_res_blocks - 1)
            blocks.append(ConvLevel(res_widths, deepest, None if deepest else "downsample", config))
            width_in = width
        self.conv_blocks = nn.ModuleList(blocks)
        self.mid = middle(widths[-1], config)
        self.norm_out = group_norm(widths[-1], config.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], config.z_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images)
        for block in self.conv_blocks:
            h = block(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z_channels, h, w] -> [B, in_channels, h*f, w*f]; `conv_blocks` runs deepest level first."""

    def __init__(self, config: VQConfig):
        super().__init__()
        widths = [config.channels * m for m in config.channel_multipliers]
        levels = len(widths)
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = middle(widths[-1], config)
        blocks = []
        width_in = widths[-1]
        for index, width in enumerate(reversed(widths)):
            shallowest = index == levels - 1
            res_widths = [(width_in, width)] + [(width, width)] * (config.decoder_res_blocks - 1)
            blocks.append(ConvLevel(res_widths, index == 0, None if shallowest else "upsample", config))
            width_in = width
        self.conv_blocks = nn.ModuleList(blocks)
        self.norm_out = group_norm(widths[0], config.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], config.in_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(latents)
        for block in self.mid:
            h = block(h)
        for block in self.conv_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup in an L2-normalised codebook, plus a rolling window of the most
    recent training codes (`codebook_used`, float32 like LlamaGen's, -1 = empty slot)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.commitment = config.commitment
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_dim)
        with torch.no_grad():
            bound = 1.0 / config.codebook_size
            self.embedding.weight.uniform_(-bound, bound)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.register_buffer("codebook_used", torch.full((config.codebook_usage_window,), -1.0))

    def normalized_codebook(self) -> torch.Tensor:
        """[K, D] codebook rows divided by their norms (LlamaGen normalises at every lookup)."""
        return F.normalize(self.embedding.weight, dim=-1)

    def forward(self, latents: torch.Tensor):
        """latents [B, D, h, w] -> (quantized [B, D, h, w], codes [B, h*w], codebook loss, commitment loss)."""
        batch, dim, height, width = latents.shape
        flat = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, dim), dim=-1)  # [B*h*w, D], row-major
        codebook = self.normalized_codebook()
        codes = torch.cat([self.nearest(rows, codebook) for rows in flat.split(DISTANCE_CHUNK_ROWS)])
        chosen = codebook[codes]  # [B*h*w, D]
        codebook_loss = F.mse_loss(chosen, flat.detach())
        commitment_loss = self.commitment * F.mse_loss(flat, chosen.detach())
        # Straight-through: the value is exactly the codebook row, the gradient goes to the latents.
        # (`flat + (chosen - flat).detach()` would carry a rounding error into the value.)
        straight_through = chosen.detach() + (flat - flat.detach())
        quantized = straight_through.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
        return quantized, codes.reshape(batch, height * width), codebook_loss, commitment_loss

    @staticmethod
    def nearest(rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Index of the codebook row [K, D] closest to each of `rows` [N, D] in squared distance."""
        distances = rows.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * rows @ codebook.t()
        return distances.argmin(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> normalised codebook rows [B, D, h, w]."""
        return self.normalized_codebook()[codes].permute(0, 3, 1, 2)

    @torch.no_grad()
    def record(self, codes: torch.Tensor) -> None:
        """Push `codes` (any shape) into the window, dropping the oldest entries."""
        window = self.codebook_used.numel()
        recent = codes.reshape(-1)[-window:].to(self.codebook_used.dtype)
        kept = self.codebook_used[recent.numel():].clone()
        self.codebook_used.copy_(torch.cat([kept, recent]))

    def usage(self) -> float:
        """Fraction of the codebook that appears in the window."""
        recorded = self.codebook_used[self.codebook_used >= 0]
        return recorded.unique().numel() / self.embedding.num_embeddings


@dataclasses.dataclass
class VQOutput:
    reconstruction: torch.Tensor  # [B, C, H, W], not clamped
    codes: torch.Tensor  # [B, h*w] long, row-major
    codebook_loss: torch.Tensor  # scalar: moves the codebook towards the latents
    commitment_loss: torch.Tensor  # scalar, already times `commitment`: moves the latents towards the codebook


class VQModel(PretrainedModel):
    """LlamaGen's VQ tokenizer: images in [-1, 1] <-> row-major grids of codebook ids."""

    config_class = VQConfig

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)

    def check_images(self, images: torch.Tensor) -> None:
        factor = self.config.downsampling_factor
        if (not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != self.config.in_channels
                or images.shape[2] % factor or images.shape[3] % factor):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ArgumentError(f"images must be a float tensor [batch, {self.config.in_channels}, H, W] with H and W "
                                f"divisible by {factor}, got {shape}")

    def quantize_latents(self, latents: torch.Tensor):
        """latents [B, codebook_dim, h, w] -> (quantized [B, codebook_dim, h, w] with a straight-through
        gradient, codes [B, h*w], codebook loss, commitment loss)."""
        return self.quantize(latents)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] in [-1, 1] -> codes long [B, h*w], p = row*w + col."""
        self.check_images(images)
        return self.quantize_latents(self.quant_conv(self.encoder(images)))[1]

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h*w] (a grid_size x grid_size grid) or [B, h, w] -> images [B, C, H, W], not clamped."""
        if not isinstance(codes, torch.Tensor) or codes.dim() not in (2, 3):
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ArgumentError(f"codes must have shape [batch, height*width] or [batch, height, width], got {shape}")
        check_ids("codes", codes.flatten(1), self.config.codebook_size, what="code id")
        if codes.dim() == 2:
            side = self.config.grid_size
            if codes.shape[1] != side * side:
                raise ArgumentError(f"codes hold {codes.shape[1]} ids per image but this tokenizer's grid is "
                                    f"{side}x{side} = {side * side}; pass [batch, height, width] codes for other sizes")
            codes = codes.reshape(-1, side, side)
        return self.decode_latents(self.quantize.lookup(codes))

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """quantized [B, codebook_dim, h, w] -> images [B, C, H, W]."""
        return self.decoder(self.post_quant_conv(quantized))

    def forward(self, images: torch.Tensor) -> VQOutput:
        """Encode, quantize and decode; in training mode also record the codes in the usage window."""
        self.check_images(images)
        quantized, codes, codebook_loss, commitment_loss = self.quantize_latents(self.quant_conv(self.encoder(images)))
        if self.training:
            self.quantize.record(codes)
        return VQOutput(self.decode_latents(quantized), codes, codebook_loss, commitment_loss)

    def codebook_usage(self) -> float:
        """Fraction of codebook entries among the most recent `codebook_usage_window` training codes."""
        return self.quantize.usage()
