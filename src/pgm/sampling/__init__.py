"""Samplers: the efficient PGM loop (and its full-length reference view), MDLM's ancestral sampler,
the autoregressive baseline's cached left-to-right sampler and the image samplers. Each is a
generator (`iterate_*`) that yields a `StepUpdate` after every step and returns the tokens;
`sample_*` runs one to its end."""

from .ar import iterate_autoregressive, sample_autoregressive
from .categorical import SamplingOptions, filter_top_p, sample_categorical, sample_scored
from .codes import generate_codes, iterate_codes
from .common import StepUpdate, run_to_end
from .mdlm import iterate_mdlm, sample_mdlm
from .pgm import iterate_pgm, sample_pgm

__all__ = ["SamplingOptions", "StepUpdate", "filter_top_p", "generate_codes", "iterate_autoregressive",
           "iterate_codes", "iterate_mdlm", "iterate_pgm", "run_to_end", "sample_autoregressive",
           "sample_categorical", "sample_mdlm", "sample_pgm", "sample_scored"]
