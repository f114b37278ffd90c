"""Schedules, partition and mask sampling, and the losses/ELBOs of each model kind."""

from .schedules import LogLinearSchedule, sample_times
from .text import (AutoregressiveObjective, LossOutput, MaskedDiffusionObjective, Noise, PartitionObjective, draw_noise, objective_for,
                   sample_groups, token_nll)

__all__ = [
    "LogLinearSchedule", "sample_times", "LossOutput", "MaskedDiffusionObjective", "PartitionObjective",
    "objective_for", "AutoregressiveObjective", "sample_groups", "token_nll", "Noise", "draw_noise",
]
