"""Schedules, partition and mask sampling, and the losses/ELBOs of each model kind."""

from ..errors import ConfigError
from .image import ImagePartitionObjective, MaskGITObjective, VQObjective
from .losses import LossOutput, model_config, token_nll
from .schedules import LogLinearSchedule, arccos_share, sample_times
from .text import (AutoregressiveObjective, MaskedDiffusionObjective, Noise, PartitionObjective, draw_noise,
                   sample_groups)


def objective_for(model, *, complement: str = "exact", label_dropout: float = 0.1):
    """The objective that trains `model`'s kind. `complement`: the text PGM's swapped-view time;
    `label_dropout`: how often a class-conditional model trains without its label."""
    config = model_config(model)
    if config.kind == "pgm" and config.num_classes:
        return ImagePartitionObjective(label_dropout=label_dropout)
    if config.kind == "pgm":
        return PartitionObjective(complement=complement)
    if config.kind == "mdlm":
        return MaskedDiffusionObjective()
    if config.kind == "ar":
        return AutoregressiveObjective()
    if config.kind == "maskgit":
        return MaskGITObjective(label_dropout=label_dropout)
    if config.kind == "vq":
        return VQObjective()
    raise ConfigError(f"no objective for model kind {config.kind!r}")


__all__ = [
    "LogLinearSchedule", "arccos_share", "sample_times", "LossOutput", "MaskedDiffusionObjective",
    "PartitionObjective", "objective_for", "AutoregressiveObjective", "ImagePartitionObjective", "MaskGITObjective",
    "VQObjective", "sample_groups", "token_nll", "Noise", "draw_noise",
]
