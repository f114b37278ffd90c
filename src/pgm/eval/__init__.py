"""Evaluation: validation perplexity (ELBO) with its Monte-Carlo error; generative perplexity."""

from .generative import GenerativeResult, generative_perplexity, load_evaluator, unigram_entropy
from .perplexity import ValidationResult, validation_elbo

__all__ = ["GenerativeResult", "ValidationResult", "generative_perplexity", "load_evaluator", "unigram_entropy",
           "validation_elbo"]
