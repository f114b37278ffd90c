"""Left-to-right sampling from the autoregressive baseline, with a key/value cache.

Known tokens must form a prefix of each row (a prompt); rows may have prompts of different
lengths: the common prefix is encoded in one pass, and after that each step feeds the known
token of a row where there is one and the drawn token otherwise.
"""

from __future__ import annotations

import torch

from ..errors import SamplingError
from .categorical import SamplingOptions, sample_categorical
from .common import StepUpdate, check_known, model_device, resolve_known, run_to_end


def sample_autoregressive(model, **options) -> torch.Tensor:
    """Generate [num_samples, length] ids: `iterate_autoregressive` run to its end (same options)."""
    return run_to_end(iterate_autoregressive(model, **options))


@torch.no_grad()
def iterate_autoregressive(model, *, num_samples: int | None = None, length: int | None = None,
                           known_tokens: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
                           options: SamplingOptions = SamplingOptions(), generator: torch.Generator | None = None,
                           use_cache: bool = True, stats: dict | None = None):
    """Generate [num_samples, length] ids one position at a time: a generator that yields a
    `StepUpdate` after every position (rows whose token there was known commit nothing) and
    returns the ids. `use_cache=False` re-runs the whole prefix every step (the slow reference
    the cache is tested against)."""
    config = model.config
    known_tokens, known_mask = resolve_known(config, num_samples, length, known_tokens, known_mask,
                                             model_device(model))
    batch, length = known_tokens.shape
    check_known(config, known_tokens, known_mask, max(1, length))
    prompt_lengths = known_mask.int().cumprod(dim=1).sum(dim=1)
    if not bool((known_mask.sum(dim=1) == prompt_lengths).all()):
        raise SamplingError("an autoregressive model can only continue a prefix: known tokens must start each row "
                            "and be contiguous")
    common = int(prompt_lengths.min())
    if common == 0:
        raise SamplingError("autoregressive sampling needs at least one known token per row (a BOS or a prompt)")
    tokens = known_tokens.clone()
    columns = torch.arange(length, device=tokens.device).expand(batch, -1)
    generated = ~known_mask
    cache = model.new_cache(length) if use_cache else None
    calls = 0
    position = common  # the next position to fill
    logits = model(tokens[:, :common], check_inputs=False, cache=cache)[:, -1]
    calls += 1
    while position < length:
        drawn = sample_categorical(logits, options, suppress=(config.mask_token_id,), generator=generator)
        tokens[:, position] = torch.where(known_mask[:, position], known_tokens[:, position], drawn)
        yield StepUpdate(position - common, positions=columns[:, position:position + 1],
                         tokens=tokens[:, position:position + 1], valid=generated[:, position:position + 1])
        position += 1
        if position == length:
            break
        if use_cache:
            logits = model(tokens[:, position - 1:position], check_inputs=False, cache=cache)[:, -1]
        else:
            logits = model(tokens[:, :position], check_inputs=False)[:, -1]
        calls += 1
    if stats is not None:
        stats["forward_calls"] = calls
    return tokens
