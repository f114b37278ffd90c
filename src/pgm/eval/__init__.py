"""Evaluation: validation perplexity (ELBO) with its Monte-Carlo error, the likelihood of given
texts, generative perplexity, and image quality (FD, IS, the VQ tokenizer's floor)."""

from .generative import GenerativeResult, generative_perplexity, load_evaluator, unigram_entropy
from .likelihood import TextScore, greedy_suffixes, score_sequences, suffix_scores
from .perplexity import ValidationResult, validation_elbo

__all__ = ["GenerativeResult", "TextScore", "ValidationResult", "generative_perplexity", "load_evaluator",
           "greedy_suffixes", "score_sequences", "suffix_scores", "unigram_entropy", "validation_elbo"]
