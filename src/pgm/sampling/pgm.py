"""Sampling from a PGM: a clean set that grows, and the positions still to decode.

State per row: the clean set (tokens and their positions, packed left in a buffer) and the
unknown positions. Each step picks `k` of them, gets their logits given the clean set, draws
them and appends them to the clean set. Only clean tokens ever go through the encoder and only
queried positions through the decoder, so a step costs about what an AR step over the clean
tokens costs.

Decoding orders:
- "random" (the paper): the unknown positions are queued in a random order; a step queries
  only the next `k`;
- "left-to-right": the same queue in position order, i.e. semi-autoregressive blocks of `k`;
- "confidence", "margin", "entropy": a step queries every unknown position, draws a token at
  each, and keeps the `k` most certain (the drawn token's probability; the gap between the two
  most likely tokens; the lowest entropy). The rest stay unknown.

Two views of the same loop:
- `view="efficient"` calls `model.predict` on the packed clean set (the fast path);
- `view="reference"` calls the training view on full-length inputs with groups = revealed (0)
  vs not (1). It is slow and exists to test the efficient path: both give the same tokens.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..objectives.schedules import LogLinearSchedule
from .categorical import SamplingOptions, sample_categorical, sample_scored
from .common import StepCounts, check_known, model_device, resolve_known

QUEUED_ORDERS = ("random", "left-to-right")
SCORED_ORDERS = ("confidence", "margin", "entropy")
ORDERS = QUEUED_ORDERS + SCORED_ORDERS


@torch.no_grad()
def sample_pgm(model, *, num_samples: int | None = None, length: int | None = None, steps: int,
               known_tokens: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
               counts: Literal["uniform", "binomial"] = "uniform", order: str = "random",
               options: SamplingOptions = SamplingOptions(), generator: torch.Generator | None = None,
               cond: torch.Tensor | None = None, view: Literal["efficient", "reference"] = "efficient",
               stats: dict | None = None) -> torch.Tensor:
    """Generate [num_samples, length] token ids in `steps` steps.

    known_tokens/known_mask [B, L] fix tokens at arbitrary positions (a prompt, a suffix, the
    text around a gap); those start in the clean set and only the rest is decoded.
    counts="uniform" decodes the unknown positions of a row as evenly as possible over the
    steps (any length, any number of steps); counts="binomial" draws each row's count per step
    from MDLM's posterior, Binomial(remaining, 1 / (steps - i)). `order` is one of ORDERS.
    `stats`, when given, receives the number of network calls under "forward_calls".
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    config = model.config
    known_tokens, known_mask = resolve_known(config, num_samples, length, known_tokens, known_mask,
                                             model_device(model))
    check_known(config, known_tokens, known_mask, steps)
    batch, length = known_tokens.shape
    device = known_tokens.device
    schedule = LogLinearSchedule()
    suppress = (config.mask_token_id,)

    # Clean-set buffers; column `length` is a sink for writes that belong to no row.
    packed = known_mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)
    slot_positions = torch.zeros(batch, length + 1, dtype=torch.long, device=device)
    slot_tokens = torch.zeros_like(slot_positions)
    slot_positions[:, :length] = packed
    slot_tokens[:, :length] = known_tokens.gather(1, packed)
    step_counts = StepCounts(known_mask.sum(1), length, steps, counts, generator)

    if view == "efficient":
        def logits_at(num_clean, lengths, queries, step_cond):
            return model.predict(slot_tokens[:, :num_clean], slot_positions[:, :num_clean], queries, lengths,
                                 step_cond, check_inputs=False)
    elif view == "reference":
        def logits_at(num_clean, lengths, queries, step_cond):
            clean = torch.arange(num_clean, device=device) < (num_clean if lengths is None else lengths[:, None])
            where = torch.where(clean, slot_positions[:, :num_clean], length)
            tokens = torch.zeros(batch, length + 1, dtype=torch.long, device=device)
            tokens.scatter_(1, where, slot_tokens[:, :num_clean])
            groups = torch.ones(batch, length + 1, dtype=torch.bool, device=device)
            groups.scatter_(1, where, False)
            full = model(tokens[:, :length], groups[:, :length], step_cond, check_inputs=False)
            return full.gather(1, queries[..., None].expand(-1, -1, full.shape[-1]))
    else:
        raise ValueError(f"view must be 'efficient' or 'reference', got {view!r}")

    if order in QUEUED_ORDERS:
        priority = (torch.rand(batch, length, generator=generator, device=device) if order == "random"
                    else torch.arange(length, device=device, dtype=torch.float).expand(batch, -1).clone())
        queue = priority.masked_fill_(known_mask, float("inf")).argsort(dim=1)  # unknown positions first
    else:
        unknown = torch.zeros(batch, length + 1, dtype=torch.bool, device=device)
        unknown[:, :length] = ~known_mask

    num_clean = step_counts.initial_clean  # an int when all rows are equal, else a [B] tensor
    decoded = torch.zeros(batch, dtype=torch.long, device=device)
    calls = 0
    for step in range(steps):
        k, width = step_counts.next(step)
        if width == 0:
            continue
        calls += 1
        step_cond = cond
        if config.time_conditioning:
            step_cond = schedule.sigma(torch.full((batch,), 1 - step / steps, device=device))
        equal = isinstance(num_clean, int)
        clean_width, lengths = (num_clean, None) if equal else (int(num_clean.max()), num_clean)
        offsets = torch.arange(width, device=device)
        if order in QUEUED_ORDERS:
            queries = queue.gather(1, (decoded[:, None] + offsets).clamp(max=length - 1))
            drawn = sample_categorical(logits_at(clean_width, lengths, queries, step_cond), options,
                                       suppress=suppress, generator=generator)
        else:
            remaining = unknown[:, :length].sum(1)
            candidates = (~unknown[:, :length]).to(torch.int8).argsort(dim=1, stable=True)[:, :int(remaining.max())]
            drawn, scores = sample_scored(logits_at(clean_width, lengths, candidates, step_cond), order, options,
                                          suppress=suppress, generator=generator)
            scores = scores.masked_fill(torch.arange(candidates.shape[1], device=device) >= remaining[:, None],
                                        float("-inf"))
            best = scores.topk(width, dim=1).indices
            queries, drawn = candidates.gather(1, best), drawn.gather(1, best)
        if equal:
            slots = num_clean + offsets.expand(batch, -1)
        else:
            slots = torch.where(offsets < k[:, None], num_clean[:, None] + offsets, length)
        slot_tokens.scatter_(1, slots, drawn)
        slot_positions.scatter_(1, slots, queries)
        if order in SCORED_ORDERS:
            unknown.scatter_(1, torch.where(slots < length, queries, length), False)
        num_clean = num_clean + k
        decoded += k

    if stats is not None:
        stats["forward_calls"] = calls
    out = torch.empty(batch, length, dtype=torch.long, device=device)
    return out.scatter_(1, slot_positions[:, :length], slot_tokens[:, :length])
