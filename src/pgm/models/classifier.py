"""The small Fashion-MNIST classifier whose penultimate features give `pgm eval --fid` its
FD (classifier features): offline there are no Inception weights, so this is the metric we can
compute here. It is not comparable to Inception FID."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..config import ModelConfig, require
from ..errors import ArgumentError
from .base import PretrainedModel


@dataclasses.dataclass
class ClassifierConfig(ModelConfig):
    """A small CNN: three stride-2 conv-BN-ReLU stages (channels, 2x, 4x), a feature layer, a linear head."""

    kind: ClassVar[str] = "classifier"

    in_channels: int = 1
    image_size: int = 32
    num_classes: int = 10
    channels: int = 32
    feature_dim: int = 128

    def validate(self) -> None:
        require(self.in_channels >= 1, f"in_channels must be positive, got {self.in_channels}")
        require(self.image_size >= 8 and self.image_size % 8 == 0,
                f"image_size must be a positive multiple of 8 (three stride-2 stages), got {self.image_size}")
        require(self.num_classes >= 2, f"num_classes must be at least 2, got {self.num_classes}")
        require(self.channels >= 1, f"channels must be positive, got {self.channels}")
        require(self.feature_dim >= 1, f"feature_dim must be positive, got {self.feature_dim}")


def _conv_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    # A stride-2 convolution pools as it convolves: a quarter of the work of convolving at full
    # resolution and max-pooling after, which is what makes training take a minute on a CPU.
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class FeatureClassifier(PretrainedModel):
    """Classifies float images in [-1, 1] [B, C, H, W]; its penultimate activations are the FD features."""

    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        width = config.channels
        self.stages = nn.Sequential(_conv_stage(config.in_channels, width), _conv_stage(width, 2 * width),
                                    _conv_stage(2 * width, 4 * width))
        spatial = (config.image_size // 8) ** 2
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * spatial, config.feature_dim), nn.ReLU())
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, feature_dim], logits [B, num_classes])."""
        expected = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ArgumentError(f"images must have shape [batch, {', '.join(map(str, expected))}], "
                                f"got {tuple(images.shape)}")
        features = self.feature(self.stages(images))
        return features, self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.features(images)[1]
