"""Evaluation: validation perplexity (ELBO) with its Monte-Carlo error."""

from .perplexity import ValidationResult, validation_elbo

__all__ = ["ValidationResult", "validation_elbo"]
