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
- a fixed permutation of the positions (a tensor), e.g. the Halton order of image cells;
- "confidence", "margin", "entropy": a step queries every unknown position, draws a token at
  each, and keeps the `k` most certain (the drawn token's probability; the gap between the two
  most likely tokens; the lowest entropy). The rest stay unknown.

Three views of the same loop:
- `view="efficient"` calls `model.predict` on the packed clean set (the fast path);
- `view="reference"` calls the training view on full-length inputs with groups = revealed (0)
  vs not (1). It is slow and exists to test the efficient path: both give the same tokens;
- `view="masked"` drives a masked model (MaskGIT) with the same loop: the clean set is written
  into a full-length input whose other positions hold the mask id.

An approximate encoder cache (`cache_refresh`, efficient view only) keeps each clean token's
encoder states from the step that encoded it (`PartitionTransformer.predict_cached`): a step
encodes only the tokens committed since the last one, and every `cache_refresh` steps (or when
the clean set has grown by the fraction `cache_growth` since the last refresh) the whole clean
set is encoded again. `cache_refresh=1` re-encodes at every step: exact PGM sampling, through
the cache's code. The first step always encodes the known tokens (BOS, prompt) in full.

Class-conditional models take their labels as `cond`; classifier-free guidance runs the
conditional and the null-class rows as one doubled batch and mixes the logits as
(1 + w) l_cond - w l_null, with w constant or ramped linearly from 0 at the first step to w at
the last (the authors' image samplers; a step with w = 0 skips the null rows).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from ..models.base import check_labels
from ..objectives.schedules import LogLinearSchedule
from .categorical import SamplingOptions, sample_categorical, sample_scored
from .common import StepCounts, StepUpdate, check_known, model_device, resolve_known, run_to_end
from .compiled import check_compile_mode, compiled_call, compiled_predict

QUEUED_ORDERS = ("random", "left-to-right")
SCORED_ORDERS = ("confidence", "margin", "entropy")
ORDERS = QUEUED_ORDERS + SCORED_ORDERS
VIEWS = ("efficient", "reference", "masked")
NEVER = "never"  # a cache_refresh that keeps the cache to the end


def refresh_interval(text: str) -> int | str:
    """A cache_refresh given as text (a command line's): a number of steps, or "never"."""
    return text if text == NEVER else int(text)


def cache_label(refresh, growth=None) -> str:
    """An encoder-cache setting in a table: "-" (none), the refresh interval, or gF (never by
    count, a refresh whenever the clean set has grown by the fraction F)."""
    if refresh is None:
        return "-"
    return f"g{growth:g}" if growth is not None else str(refresh)


def check_cache_refresh(refresh, growth=None) -> None:
    """Refuse a cache_refresh that is not a positive step count or "never", and a cache_growth
    that is not a positive fraction or comes without a cache."""
    if refresh is not None and refresh != NEVER and (isinstance(refresh, bool) or not isinstance(refresh, int)
                                                     or refresh < 1):
        raise ValueError(f"cache_refresh must be a positive number of steps or {NEVER!r}, got {refresh!r}")
    if growth is not None:
        if refresh is None:
            raise ValueError("cache_growth refreshes the encoder cache: give cache_refresh too (e.g. 'never')")
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not growth > 0:
            raise ValueError(f"cache_growth must be a positive fraction of the clean set, got {growth!r}")


def cache_settings(refreshes=(), growths=()) -> list[tuple]:
    """(cache_refresh, cache_growth) pairs, each checked: one per refresh interval, and one per
    growth fraction that refreshes by growth alone (never by count)."""
    settings = [(refresh, None) for refresh in refreshes] + [(NEVER, growth) for growth in growths]
    for setting in settings:
        check_cache_refresh(*setting)
    return settings


class RefreshSchedule:
    """When the encoder cache encodes the whole clean set again: at the first call, after
    `refresh` calls since the last refresh (never: not by count), and whenever the clean set
    has grown past (1 + `growth`) times its size at the last refresh."""

    def __init__(self, refresh, growth: float | None = None):
        self.every = None if refresh == NEVER else refresh
        self.growth = growth
        self.since = self.size = None  # calls since the last refresh, and the clean set's size then

    def due(self, clean: int) -> bool:
        """Whether this call, over `clean` tokens (the widest row), is a refresh."""
        full = (self.since is None or (self.every is not None and self.since >= self.every)
                or (self.growth is not None and clean > (1 + self.growth) * self.size))
        if full:
            self.since, self.size = 0, clean
        self.since += 1
        return full


def guidance_weight(guidance: float, step: int, steps: int, schedule: str) -> float:
    """The guidance weight w at `step`: constant, or ramped linearly from 0 to `guidance`."""
    if schedule == "constant":
        return guidance
    if schedule == "linear":
        return guidance * step / (steps - 1) if steps > 1 else guidance
    raise ValueError(f"guidance_schedule must be 'linear' or 'constant', got {schedule!r}")


def guided_logits(conditional: torch.Tensor, unconditional: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance on logits: (1 + w) l_cond - w l_null, in float32."""
    return (1 + weight) * conditional.float() - weight * unconditional.float()


def sample_pgm(model, **options) -> torch.Tensor:
    """Generate [num_samples, length] token ids: `iterate_pgm` run to its end (same options)."""
    return run_to_end(iterate_pgm(model, **options))


@torch.no_grad()
def iterate_pgm(model, *, num_samples: int | None = None, length: int | None = None, steps: int,
               known_tokens: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
               counts: Literal["uniform", "arccos", "binomial"] = "uniform", order: str | torch.Tensor = "random",
               options: SamplingOptions = SamplingOptions(), generator: torch.Generator | None = None,
               cond: torch.Tensor | None = None, guidance: float = 0.0,
               guidance_schedule: Literal["linear", "constant"] = "linear",
               first_step_temperature_scale: float = 1.0, confidence_noise: float = 0.0,
               suppress: tuple[int, ...] | None = None, view: str = "efficient", hide_newest: bool = False,
               redraw: bool = False, cache_refresh: int | str | None = None, cache_growth: float | None = None,
               compile: str | None = None, stats: dict | None = None):
    """Generate [num_samples, length] token ids in `steps` steps: a generator that yields a
    `StepUpdate` (the positions and tokens committed) after every step that decodes something,
    and returns the tokens.

    known_tokens/known_mask [B, L] fix tokens at arbitrary positions (a prompt, a suffix, the
    text around a gap, the visible part of an image); those start in the clean set and only the
    rest is decoded. counts: "uniform" decodes the unknown positions of a row as evenly as
    possible over the steps; "arccos" follows the image samplers' schedule; "binomial" draws
    each row's count per step from MDLM's posterior. `order`: one of ORDERS or a permutation [L]
    of the positions. `cond`: noise levels (time-conditioned text models) or class labels [B].
    `guidance` > 0 needs a class-conditional model. `first_step_temperature_scale` multiplies the
    temperature at step 0 (the authors' image samplers use 2: they halve the first logits).
    `confidence_noise` adds Gumbel noise, annealed to 0 over the steps, to the log-confidence
    of the "confidence" order (MaskGIT's randomisation; the authors use 5 for images).
    `suppress`: ids never drawn (default: the mask id). `cache_refresh`, `cache_growth`: the
    approximate encoder cache (see the module's docstring); None: exact sampling without it.
    `compile`: a torch.compile mode (`pgm.sampling.compiled.COMPILE_MODES`) for the network
    calls of the efficient and masked views, their shapes padded to buckets; None: eager.
    `stats`, when given, receives the number of network calls under "forward_calls" (and with
    the cache, the number of full encodings under "cache_refreshes").

    Two departures of the authors' image samplers, each reproducible on request:
    `hide_newest` hides the most recently appended clean token from every step (their image PGM
    counts its register in the clean set's length but not in its masks, an off-by-one: at the
    first step only the register is visible); `redraw` (masked view, queued or fixed orders)
    draws every cell decoded so far again at each step, as the PGM paper's MaskGIT baseline
    sampler did (upstream Halton-MaskGIT now draws only the new cells).
    """
    fixed_order = isinstance(order, torch.Tensor)
    if not fixed_order and order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)} or a permutation of the positions, got {order!r}")
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
    if confidence_noise and order != "confidence":
        raise ValueError("confidence_noise applies to the confidence order only")
    if hide_newest and view == "masked":
        raise ValueError("hide_newest reproduces the image PGM's inference; a masked model has no clean set to hide")
    if redraw and (view != "masked" or not (fixed_order or order in QUEUED_ORDERS)):
        raise ValueError("redraw applies to a masked model (MaskGIT) decoding in a queued or fixed order")
    check_cache_refresh(cache_refresh, cache_growth)
    if cache_refresh is not None and (view != "efficient" or not hasattr(model, "predict_cached")):
        raise ValueError("the encoder cache (cache_refresh) needs a PGM sampled in the efficient view")
    check_compile_mode(compile)
    if compile and view == "reference":
        raise ValueError("the reference view is the slow check of the efficient one and is not compiled")
    if compile and cache_refresh is not None:
        raise ValueError("the encoder cache (cache_refresh) is not compiled: give compile or cache_refresh, not both")
    config = model.config
    known_tokens, known_mask = resolve_known(config, num_samples, length, known_tokens, known_mask,
                                             model_device(model))
    check_known(config, known_tokens, known_mask, steps)
    batch, length = known_tokens.shape
    device = known_tokens.device
    if fixed_order and sorted(order.tolist()) != list(range(length)):
        raise ValueError(f"a fixed order must be a permutation of the {length} positions")
    num_classes = getattr(config, "num_classes", 0)
    if guidance and not num_classes:
        raise ValueError("classifier-free guidance needs a class-conditional model")
    if num_classes:
        check_labels(cond, batch, num_classes)
        cond = torch.as_tensor(cond, device=device).long().reshape(-1).expand(batch).contiguous()
    guidance_weight(guidance, 0, steps, guidance_schedule)  # validates the schedule's name
    time_conditioned = getattr(config, "time_conditioning", False)
    guided_cond = torch.cat([cond, torch.full_like(cond, num_classes)]) if guidance else None
    fixed_cond = cond
    if not compile:
        # Conditioning that is the same at every step (class labels, or no noise level) has its
        # adaLN modulations computed once; a compiled network computes them inside its graph.
        fixed_cond = None if time_conditioned else model.condition(cond, batch)
        guided_cond = None if guided_cond is None else model.condition(guided_cond, 2 * batch)
    schedule = LogLinearSchedule()
    suppress = (config.mask_token_id,) if suppress is None else tuple(suppress)

    # Clean-set buffers; column `length` is a sink for writes that belong to no row.
    packed = known_mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)
    slot_positions = torch.zeros(batch, length + 1, dtype=torch.long, device=device)
    slot_tokens = torch.zeros_like(slot_positions)
    slot_positions[:, :length] = packed
    slot_tokens[:, :length] = known_tokens.gather(1, packed)
    step_counts = StepCounts(known_mask.sum(1), length, steps, counts, generator)

    cache = model.new_cache() if cache_refresh is not None else None
    refresh_schedule = RefreshSchedule(cache_refresh, cache_growth)
    refresh_now = False

    def network(tokens, positions, num_clean, lengths, queries, step_cond):
        """Logits [b, Q, V] at `queries` given the first num_clean (or `lengths`) slots of each row."""
        if cache is not None:
            return model.predict_cached(cache, tokens, positions, num_clean if lengths is None else lengths, queries,
                                        step_cond, refresh=refresh_now)
        if view == "efficient":
            if compile:
                return compiled_predict(model, compile, tokens, positions, num_clean, lengths, queries, step_cond)
            return model.predict(tokens[:, :num_clean], positions[:, :num_clean], queries, lengths, step_cond,
                                 check_inputs=False)
        rows = tokens.shape[0]
        clean = torch.arange(num_clean, device=device) < (num_clean if lengths is None else lengths[:, None])
        where = torch.where(clean, positions[:, :num_clean], length)
        filler = config.mask_token_id if view == "masked" else 0
        full_tokens = torch.full((rows, length + 1), filler, dtype=torch.long, device=device)
        full_tokens.scatter_(1, where, tokens[:, :num_clean])
        if view == "masked":
            if compile:
                full = compiled_call(model, "forward", compile, full_tokens[:, :length], step_cond, check_inputs=False)
            else:
                full = model(full_tokens[:, :length], step_cond, check_inputs=False)
        else:
            groups = torch.ones(rows, length + 1, dtype=torch.bool, device=device)
            groups.scatter_(1, where, False)
            full = model(full_tokens[:, :length], groups[:, :length], step_cond, check_inputs=False)
        return full.gather(1, queries[..., None].expand(-1, -1, full.shape[-1]))

    def logits_at(num_clean, lengths, queries, step_cond, weight):
        # With a cache, the null rows run at every step (w = 0 too) so that their cache keeps up.
        if not weight and not (guidance and cache is not None):
            return network(slot_tokens, slot_positions, num_clean, lengths, queries, step_cond)
        def twice(t):
            return None if t is None else torch.cat([t, t])
        both = network(twice(slot_tokens), twice(slot_positions), num_clean, twice(lengths), twice(queries),
                       guided_cond)
        return guided_logits(*both.chunk(2), weight) if weight else both[:batch]

    if fixed_order or order in QUEUED_ORDERS:
        if fixed_order:
            priority = torch.empty(length, device=device)
            priority[order.to(device)] = torch.arange(length, device=device, dtype=torch.float)
            priority = priority.expand(batch, -1).clone()
        elif order == "random":
            priority = torch.rand(batch, length, generator=generator, device=device)
        else:
            priority = torch.arange(length, device=device, dtype=torch.float).expand(batch, -1).clone()
        queue = priority.masked_fill_(known_mask, float("inf")).argsort(dim=1)  # unknown positions first
    else:
        unknown = torch.zeros(batch, length + 1, dtype=torch.bool, device=device)
        unknown[:, :length] = ~known_mask

    num_clean = step_counts.initial_clean  # an int when all rows are equal, else a [B] tensor
    decoded = torch.zeros(batch, dtype=torch.long, device=device)
    calls = refreshes = 0
    for step in range(steps):
        k, width = step_counts.next(step)
        if width == 0:
            continue
        calls += 1
        step_cond = fixed_cond
        if time_conditioned:
            step_cond = schedule.sigma(torch.full((batch,), 1 - step / steps, device=device))
        step_options = options
        if step == 0 and first_step_temperature_scale != 1:
            step_options = dataclasses.replace(options, temperature=options.temperature * first_step_temperature_scale)
        weight = guidance_weight(guidance, step, steps, guidance_schedule)
        equal = isinstance(num_clean, int)
        clean_width, lengths = (num_clean, None) if equal else (int(num_clean.max()), num_clean)
        if hide_newest:  # the newest clean token is no key of this step (see the docstring)
            lengths = (torch.full((batch,), num_clean, device=device) if equal else num_clean) - 1
        if cache is not None:
            refresh_now = refresh_schedule.due(clean_width)
            refreshes += refresh_now
        offsets = torch.arange(width, device=device)
        update = None  # what the step reports, when it is more than the new draws
        if redraw:
            if not equal:
                raise ValueError("redraw needs the same number of known cells in every row")
            again = slot_positions[:, step_counts.initial_clean:num_clean]  # every cell decoded so far
            queries = torch.cat([again, queue.gather(1, (decoded[:, None] + offsets).clamp(max=length - 1))], 1)
            drawn = sample_categorical(logits_at(clean_width, lengths, queries, step_cond, weight), step_options,
                                       suppress=suppress, generator=generator)
            slot_tokens[:, step_counts.initial_clean:num_clean] = drawn[:, :again.shape[1]]
            update = StepUpdate(step, positions=queries, tokens=drawn)
            queries, drawn = queries[:, again.shape[1]:], drawn[:, again.shape[1]:]
        elif fixed_order or order in QUEUED_ORDERS:
            queries = queue.gather(1, (decoded[:, None] + offsets).clamp(max=length - 1))
            drawn = sample_categorical(logits_at(clean_width, lengths, queries, step_cond, weight), step_options,
                                       suppress=suppress, generator=generator)
        else:
            remaining = unknown[:, :length].sum(1)
            candidates = (~unknown[:, :length]).to(torch.int8).argsort(dim=1, stable=True)[:, :int(remaining.max())]
            drawn, scores = sample_scored(logits_at(clean_width, lengths, candidates, step_cond, weight), order,
                                          step_options, suppress=suppress, generator=generator)
            if confidence_noise:
                uniform = torch.rand(scores.shape, generator=generator, device=device).clamp_(min=1e-20)
                annealing = 1 - step / (steps - 1) if steps > 1 else 0.0
                scores = scores.clamp(min=1e-30).log() + confidence_noise * annealing * -torch.log(-torch.log(uniform))
            scores = scores.masked_fill(torch.arange(candidates.shape[1], device=device) >= remaining[:, None],
                                        float("-inf"))
            best = scores.topk(width, dim=1).indices
            queries, drawn = candidates.gather(1, best), drawn.gather(1, best)
        valid = None
        if equal:
            slots = num_clean + offsets.expand(batch, -1)
        else:
            valid = offsets < k[:, None]
            slots = torch.where(valid, num_clean[:, None] + offsets, length)
        slot_tokens.scatter_(1, slots, drawn)
        slot_positions.scatter_(1, slots, queries)
        if not fixed_order and order in SCORED_ORDERS:
            unknown.scatter_(1, torch.where(slots < length, queries, length), False)
        num_clean = num_clean + k
        decoded += k
        yield update or StepUpdate(step, positions=queries, tokens=drawn, valid=valid)

    if stats is not None:
        stats["forward_calls"] = calls
        if cache is not None:
            stats["cache_refreshes"] = refreshes
    out = torch.empty(batch, length, dtype=torch.long, device=device)
    return out.scatter_(1, slot_positions[:, :length], slot_tokens[:, :length])
