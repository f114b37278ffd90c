"""Samplers: the efficient PGM loop (and its full-length reference view) and MDLM's ancestral sampler."""

from .categorical import SamplingOptions, filter_top_p, sample_categorical
from .mdlm import sample_mdlm
from .pgm import sample_pgm

__all__ = ["SamplingOptions", "filter_top_p", "sample_categorical", "sample_mdlm", "sample_pgm"]
