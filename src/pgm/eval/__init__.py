"""Evaluation: validation perplexity (ELBO) with its Monte-Carlo error, the likelihood of given
texts, generative perplexity, and image quality (FD, IS, the VQ tokenizer's floor)."""

from .generative import GenerativeResult, generative_perplexity, load_evaluator, unigram_entropy
from .perplexity import TextScore, ValidationResult, score_sequences, validation_elbo

__all__ = ["GenerativeResult", "TextScore", "ValidationResult", "generative_perplexity", "load_evaluator",
           "score_sequences", "unigram_entropy", "validation_elbo"]
