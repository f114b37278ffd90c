"""Samplers: the efficient PGM loop (and its full-length reference view), MDLM's ancestral sampler
and the autoregressive baseline's cached left-to-right sampler."""

from .ar import sample_autoregressive
from .categorical import SamplingOptions, filter_top_p, sample_categorical, sample_scored
from .mdlm import sample_mdlm
from .pgm import sample_pgm

__all__ = ["SamplingOptions", "filter_top_p", "sample_categorical", "sample_scored", "sample_mdlm", "sample_pgm", "sample_autoregressive"]
