"""Training losses of the image models: the VQ tokenizer, the class-conditional PGM, MaskGIT.

Token rows are `[BOS, c_0 .. c_{N-1}]`, the VQ codes of an image in raster order after a BOS
(the authors' layout); the PGM keeps the BOS as a clean token that is never scored, MaskGIT drops
it. Both draw the share of hidden tokens from the arccos schedule, arccos(t) / (pi / 2) with
t ~ U(0, 1), so most steps hide most of the image, and both replace a row's label by the null
class with probability `label_dropout`, which teaches the unconditional model that classifier-
free guidance needs.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..errors import DataError
from .losses import LossOutput, finish, model_config, token_nll
from .schedules import arccos_share


@dataclasses.dataclass
class ImageNoise:
    """The randomness of one image loss: a time per row, a uniform per token, label dropout per row."""

    t: torch.Tensor  # [B]
    u: torch.Tensor  # [B, L]
    drop_label: torch.Tensor  # [B] bool

    def __getitem__(self, rows) -> "ImageNoise":
        return ImageNoise(self.t[rows], self.u[rows], self.drop_label[rows])

    def to(self, device) -> "ImageNoise":
        return ImageNoise(self.t.to(device), self.u.to(device), self.drop_label.to(device))


@dataclasses.dataclass
class _ClassConditionalObjective:
    label_dropout: float = 0.1

    def draw_noise(self, batch_size: int, length: int, generator=None, device=None, *,
                   label_dropout: float | None = None) -> ImageNoise:
        p = self.label_dropout if label_dropout is None else label_dropout
        return ImageNoise(torch.rand(batch_size, generator=generator, device=device),
                          torch.rand(batch_size, length, generator=generator, device=device),
                          torch.rand(batch_size, generator=generator, device=device) < p)

    def elbo(self, model, tokens, valid=None, always_clean=None, generator=None, noise=None,
             labels=None) -> LossOutput:
        """The evaluation loss: the training loss with every label kept."""
        if noise is not None:
            noise = dataclasses.replace(noise, drop_label=torch.zeros_like(noise.drop_label))
        return self.loss(model, tokens, valid, always_clean, generator, noise, labels, label_dropout=0.0)


def _conditioning_labels(model, labels: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    null_class = model_config(model).num_classes
    return torch.where(drop, null_class, labels.to(drop.device))


@dataclasses.dataclass
class ImagePartitionObjective(_ClassConditionalObjective):
    """PGM on images (the authors' objective): each token joins group 1 with the arccos share,
    and the cross-entropy of every token of both groups, each predicted from the other group,
    is averaged. The BOS stays in group 0 and is not scored."""

    def loss(self, model, tokens, valid=None, always_clean=None, generator=None, noise=None, labels=None, *,
             label_dropout: float | None = None) -> LossOutput:
        if noise is None:
            noise = self.draw_noise(*tokens.shape, generator=generator, device=tokens.device,
                                    label_dropout=label_dropout)
        config = model_config(model)
        groups = noise.u < arccos_share(noise.t)[:, None]
        scored = torch.ones_like(tokens, dtype=torch.bool)
        scored[:, 0] = False  # the BOS
        groups &= scored
        logits = model(tokens, groups, _conditioning_labels(model, _require(labels), noise.drop_label),
                       check_inputs=False)
        return finish(token_nll(logits, tokens, config.mask_token_id), scored)


@dataclasses.dataclass
class MaskGITObjective(_ClassConditionalObjective):
    """MaskGIT: hide each code with the arccos share (replace it by the mask id) and score the
    predictions at the hidden codes. (Halton-MaskGIT scores every code, the visible ones
    included; those are copies, and our sampler never re-draws a decoded cell.)"""

    def loss(self, model, tokens, valid=None, always_clean=None, generator=None, noise=None, labels=None, *,
             label_dropout: float | None = None) -> LossOutput:
        codes = tokens[:, 1:]  # MaskGIT has no BOS
        if noise is None:
            noise = self.draw_noise(*tokens.shape, generator=generator, device=tokens.device,
                                    label_dropout=label_dropout)
        config = model_config(model)
        masked = noise.u[:, -codes.shape[1]:] < arccos_share(noise.t)[:, None]
        inputs = torch.where(masked, config.mask_token_id, codes)
        logits = model(inputs, _conditioning_labels(model, _require(labels), noise.drop_label), check_inputs=False)
        nll = token_nll(logits, codes, config.mask_token_id)
        return finish(nll, masked)


@dataclasses.dataclass
class VQObjective:
    """The VQ autoencoder's loss: pixel MSE + codebook loss + beta * commitment loss. Rows hold
    uint8 pixels; `nll_sum / tokens` is the mean squared error per pixel on the [-1, 1] scale.
    (LlamaGen adds a perceptual and an adversarial loss; both need pretrained networks that are
    not available offline.)"""

    def draw_noise(self, batch_size: int, length: int, generator=None, device=None) -> None:
        return None

    def loss(self, model, tokens, valid=None, always_clean=None, generator=None, noise=None, labels=None,
             ) -> LossOutput:
        config = model_config(model)
        images = tokens.float().div(127.5).sub(1.0).view(tokens.shape[0], config.in_channels, config.image_size,
                                                          config.image_size)
        out = model(images)
        squared = F.mse_loss(out.reconstruction.float(), images, reduction="none").flatten(1)
        result = finish(squared, torch.ones_like(squared, dtype=torch.bool))
        result.loss = result.loss + out.codebook_loss + out.commitment_loss  # the latter already scaled by beta
        return result

    elbo = loss


def _require(labels):
    if labels is None:
        raise DataError("a class-conditional model trains on labelled images, but the data has no labels")
    return labels
