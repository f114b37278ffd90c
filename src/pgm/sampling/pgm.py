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

Two departures of the authors' image samplers, each reproducible on request: `hide_newest` hides
the most recently appended clean token from every step (their image PGM counts its register in
the clean set's length but not in its masks, an off-by-one: at the first step only the register
is visible); `redraw` (masked view, queued or fixed orders) draws every cell decoded so far again
at each step, as the PGM paper's MaskGIT baseline sampler did (upstream Halton-MaskGIT now draws
only the new cells).

Class-conditional models take their labels as `cond`; classifier-free guidance runs the
conditional and the null-class rows as one doubled batch and mixes the logits as
(1 + w) l_cond - w l_null, with w constant or ramped linearly from 0 at the first step to w at
the last (the authors' image samplers; a step with w = 0 skips the null rows).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from ..errors import SamplingError
from ..models.base import check_labels
from ..objectives.schedules import LogLinearSchedule
from .categorical import SamplingOptions, sample_categorical, sample_scored
from .common import StepCounts, StepUpdate, check_known, model_device, resolve_known, run_to_end
from .compiled import compiled_call, compiled_predict
from .settings import NEVER, QUEUED_ORDERS

VIEWS = ("efficient", "reference", "masked")


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
    raise SamplingError(f"guidance_schedule must be 'linear' or 'constant', got {schedule!r}")


def guided_logits(conditional: torch.Tensor, unconditional: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance on logits: (1 + w) l_cond - w l_null, in float32."""
    return (1 + weight) * conditional.float() - weight * unconditional.float()


def sample_pgm(model, **options) -> torch.Tensor:
    """Generate [num_samples, length] token ids: `iterate_pgm` run to its end (same options)."""
    return run_to_end(iterate_pgm(model, **options))


def _check_views(model, order, view: str, confidence_noise: float, hide_newest: bool, redraw: bool,
                 cache_refresh, compile: str | None) -> None:
    """The loop's own arguments that go together (the settings' values are checked by
    `SamplerSettings.resolve`, not here again)."""
    fixed_order = isinstance(order, torch.Tensor)
    if view not in VIEWS:
        raise SamplingError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
    if confidence_noise and order != "confidence":
        raise SamplingError("confidence_noise applies to the confidence order only")
    if hide_newest and view == "masked":
        raise SamplingError("hide_newest reproduces the image PGM's inference; a masked model has no clean set to hide")
    if redraw and (view != "masked" or not (fixed_order or order in QUEUED_ORDERS)):
        raise SamplingError("redraw applies to a masked model (MaskGIT) decoding in a queued or fixed order")
    if cache_refresh is not None and (view != "efficient" or not hasattr(model, "predict_cached")):
        raise SamplingError("the encoder cache (cache_refresh) needs a PGM sampled in the efficient view")
    if compile and view == "reference":
        raise SamplingError("the reference view is the slow check of the efficient one and is not compiled")


class _StepLogits:
    """The model's logits at a step's queries given the clean set, in the loop's view: `predict`
    on the packed clean set (efficient; through the encoder cache when there is one), the training
    view on full-length inputs (reference), or the masked model's forward (masked); with
    classifier-free guidance, the conditional and null-class rows as one doubled batch."""

    def __init__(self, model, view: str, compile: str | None, length: int, cache_refresh, cache_growth,
                 guidance: float, guided_cond: torch.Tensor | None):
        self.model, self.view, self.compile, self.length = model, view, compile, length
        self.cache = model.new_cache() if cache_refresh is not None else None
        self.refreshes = RefreshSchedule(cache_refresh, cache_growth)
        self.refresh_now = False
        self.guidance, self.guided_cond = guidance, guided_cond

    def unguided(self, tokens, positions, num_clean, lengths, queries, step_cond):
        """Logits [b, Q, V] at `queries` [b, Q] given the first num_clean (or `lengths`) slots of each row."""
        model = self.model
        if self.cache is not None:
            return model.predict_cached(self.cache, tokens, positions, num_clean if lengths is None else lengths,
                                        queries, step_cond, refresh=self.refresh_now)
        if self.view == "efficient":
            if self.compile:
                return compiled_predict(model, self.compile, tokens, positions, num_clean, lengths, queries, step_cond)
            return model.predict(tokens[:, :num_clean], positions[:, :num_clean], queries, lengths, step_cond,
                                 check_inputs=False)
        full = self._full_length(tokens, positions, num_clean, lengths, step_cond)  # [b, L, V]
        return full.gather(1, queries[..., None].expand(-1, -1, full.shape[-1]))

    def _full_length(self, tokens, positions, num_clean, lengths, step_cond):
        """The reference and masked views: the clean set written into full-length rows."""
        model, length, device = self.model, self.length, tokens.device
        rows = tokens.shape[0]
        clean = torch.arange(num_clean, device=device) < (num_clean if lengths is None else lengths[:, None])
        where = torch.where(clean, positions[:, :num_clean], length)  # column `length` is a sink
        filler = model.config.mask_token_id if self.view == "masked" else 0
        full_tokens = torch.full((rows, length + 1), filler, dtype=torch.long, device=device)
        full_tokens.scatter_(1, where, tokens[:, :num_clean])
        if self.view == "masked":
            if self.compile:
                return compiled_call(model, "forward", self.compile, full_tokens[:, :length], step_cond,
                                     check_inputs=False)
            return model(full_tokens[:, :length], step_cond, check_inputs=False)
        groups = torch.ones(rows, length + 1, dtype=torch.bool, device=device)
        groups.scatter_(1, where, False)
        return model(full_tokens[:, :length], groups[:, :length], step_cond, check_inputs=False)

    def __call__(self, tokens, positions, num_clean, lengths, queries, step_cond, weight: float):
        """The step's logits [B, Q, V], guided with weight `weight` (0: the conditional rows alone)."""
        # With a cache, the null rows run at every step (w = 0 too) so that their cache keeps up.
        if not weight and not (self.guidance and self.cache is not None):
            return self.unguided(tokens, positions, num_clean, lengths, queries, step_cond)

        def twice(t):
            return None if t is None else torch.cat([t, t])

        both = self.unguided(twice(tokens), twice(positions), num_clean, twice(lengths), twice(queries),
                             self.guided_cond)
        batch = tokens.shape[0]
        return guided_logits(*both.chunk(2), weight) if weight else both[:batch]


def _conditioning(model, cond, batch: int, guidance: float, compile: str | None, device):
    """(the labels or noise levels [B] every step shares, the doubled batch's for guidance, whether
    each step computes its own noise level)."""
    config = model.config
    num_classes = getattr(config, "num_classes", 0)
    if guidance and not num_classes:
        raise SamplingError("classifier-free guidance needs a class-conditional model")
    if num_classes:
        check_labels(cond, batch, num_classes)
        cond = torch.as_tensor(cond, device=device).long().reshape(-1).expand(batch).contiguous()
    time_conditioned = getattr(config, "time_conditioning", False)
    guided_cond = torch.cat([cond, torch.full_like(cond, num_classes)]) if guidance else None
    fixed_cond = cond
    if not compile:
        # Conditioning that is the same at every step (class labels, or no noise level) has its
        # adaLN modulations computed once; a compiled network computes them inside its graph.
        fixed_cond = None if time_conditioned else model.condition(cond, batch)
        guided_cond = None if guided_cond is None else model.condition(guided_cond, 2 * batch)
    return fixed_cond, guided_cond, time_conditioned


def _queue(order, known_mask: torch.Tensor, generator) -> torch.Tensor:
    """The unknown positions of each row [B, L] in the order they are decoded (known ones last)."""
    batch, length = known_mask.shape
    device = known_mask.device
    if isinstance(order, torch.Tensor):
        priority = torch.empty(length, device=device)
        priority[order.to(device)] = torch.arange(length, device=device, dtype=torch.float)
        priority = priority.expand(batch, -1).clone()
    elif order == "random":
        priority = torch.rand(batch, length, generator=generator, device=device)
    else:
        priority = torch.arange(length, device=device, dtype=torch.float).expand(batch, -1).clone()
    return priority.masked_fill_(known_mask, float("inf")).argsort(dim=1)


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
    and returns the tokens. The settings among the arguments (steps, order, options, guidance and
    its schedule, the cache, hide_newest, redraw, compile: see `pgm.sampling.settings`) come as
    `SamplerSettings.resolve` leaves them and are not checked again here.

    known_tokens/known_mask [B, L] fix tokens at arbitrary positions (a prompt, the text around a
    gap, the visible part of an image): those start in the clean set. counts: "uniform" decodes a
    row's unknown positions as evenly as possible over the steps, "arccos" follows the image
    samplers' schedule, "binomial" draws each row's count per step from MDLM's posterior. `order`
    may also be a permutation [L] of the positions. `cond`: noise levels (time-conditioned text
    models) or class labels [B]. `first_step_temperature_scale` multiplies the temperature at step
    0 (the authors' image samplers use 2); `confidence_noise` adds Gumbel noise, annealed to 0, to
    the confidence order's log-confidence (MaskGIT's; 5 for the authors' images); `suppress`: ids
    never drawn (default: the mask id). `stats`, when given, receives the number of network calls
    ("forward_calls") and, with the cache, of full encodings ("cache_refreshes").
    """
    _check_views(model, order, view, confidence_noise, hide_newest, redraw, cache_refresh, compile)
    config = model.config
    known_tokens, known_mask = resolve_known(config, num_samples, length, known_tokens, known_mask,
                                             model_device(model))
    check_known(config, known_tokens, known_mask, steps)
    batch, length = known_tokens.shape
    device = known_tokens.device
    queued = isinstance(order, torch.Tensor) or order in QUEUED_ORDERS
    if isinstance(order, torch.Tensor) and sorted(order.tolist()) != list(range(length)):
        raise SamplingError(f"a fixed order must be a permutation of the {length} positions")
    fixed_cond, guided_cond, time_conditioned = _conditioning(model, cond, batch, guidance, compile, device)
    step_logits = _StepLogits(model, view, compile, length, cache_refresh, cache_growth, guidance, guided_cond)
    schedule = LogLinearSchedule()
    suppress = (config.mask_token_id,) if suppress is None else tuple(suppress)

    slot_tokens, slot_positions = _clean_slots(known_tokens, known_mask)
    step_counts = StepCounts(known_mask.sum(1), length, steps, counts, generator)
    if queued:
        queue = _queue(order, known_mask, generator)  # [B, L]
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
        if step_logits.cache is not None:
            step_logits.refresh_now = step_logits.refreshes.due(clean_width)
            refreshes += step_logits.refresh_now

        def logits_at(queries):  # [B, Q] -> [B, Q, V]
            return step_logits(slot_tokens, slot_positions, clean_width, lengths, queries, step_cond, weight)

        offsets = torch.arange(width, device=device)
        update = None  # what the step reports, when it is more than the new draws
        if queued:
            queries = queue.gather(1, (decoded[:, None] + offsets).clamp(max=length - 1))  # [B, width]
            if redraw:  # every cell decoded so far, queried again with the new ones
                if not equal:
                    raise SamplingError("redraw needs the same number of known cells in every row")
                again = slot_positions[:, step_counts.initial_clean:num_clean]
                queries = torch.cat([again, queries], 1)
            drawn = sample_categorical(logits_at(queries), step_options, suppress=suppress, generator=generator)
            if redraw:
                slot_tokens[:, step_counts.initial_clean:num_clean] = drawn[:, :again.shape[1]]
                update = StepUpdate(step, positions=queries, tokens=drawn)
                queries, drawn = queries[:, again.shape[1]:], drawn[:, again.shape[1]:]
        else:
            queries, drawn = _most_certain(logits_at, unknown[:, :length], width, order, step, steps, step_options,
                                           suppress, confidence_noise, generator)
        valid = _commit(slot_tokens, slot_positions, None if queued else unknown, num_clean, k, queries, drawn)
        num_clean = num_clean + k
        decoded += k
        yield update or StepUpdate(step, positions=queries, tokens=drawn, valid=valid)

    if stats is not None:
        stats["forward_calls"] = calls
        if step_logits.cache is not None:
            stats["cache_refreshes"] = refreshes
    out = torch.empty(batch, length, dtype=torch.long, device=device)
    return out.scatter_(1, slot_positions[:, :length], slot_tokens[:, :length])


def _commit(slot_tokens, slot_positions, unknown, num_clean, k, queries, drawn) -> torch.Tensor | None:
    """Append a step's draws [B, width] to the clean set (and take them out of `unknown`, for a
    scored order); returns which columns each row really decoded (None: all of them)."""
    batch, width = queries.shape
    length = slot_tokens.shape[1] - 1
    offsets = torch.arange(width, device=queries.device)
    valid = None
    if isinstance(num_clean, int):
        slots = num_clean + offsets.expand(batch, -1)
    else:
        valid = offsets < k[:, None]
        slots = torch.where(valid, num_clean[:, None] + offsets, length)  # the rest to the sink
    slot_tokens.scatter_(1, slots, drawn)
    slot_positions.scatter_(1, slots, queries)
    if unknown is not None:
        unknown.scatter_(1, torch.where(slots < length, queries, length), False)
    return valid


def _clean_slots(known_tokens: torch.Tensor, known_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean set as slot buffers (tokens, positions) [B, L + 1], the known tokens packed left;
    column L is a sink for the writes that belong to no row."""
    batch, length = known_tokens.shape
    packed = known_mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)
    slot_positions = torch.zeros(batch, length + 1, dtype=torch.long, device=known_tokens.device)
    slot_tokens = torch.zeros_like(slot_positions)
    slot_positions[:, :length] = packed
    slot_tokens[:, :length] = known_tokens.gather(1, packed)
    return slot_tokens, slot_positions


def _most_certain(logits_at, unknown: torch.Tensor, width: int, order: str, step: int, steps: int,
                  options: SamplingOptions, suppress, confidence_noise: float, generator):
    """A scored order's step: draw a token at every unknown position [B, L] and keep the `width`
    most certain of each row (with the confidence order's annealed Gumbel noise): (positions,
    tokens) [B, width]."""
    device = unknown.device
    remaining = unknown.sum(1)
    candidates = (~unknown).to(torch.int8).argsort(dim=1, stable=True)[:, :int(remaining.max())]
    drawn, scores = sample_scored(logits_at(candidates), order, options, suppress=suppress, generator=generator)
    if confidence_noise:
        uniform = torch.rand(scores.shape, generator=generator, device=device).clamp_(min=1e-20)
        annealing = 1 - step / (steps - 1) if steps > 1 else 0.0
        scores = scores.clamp(min=1e-30).log() + confidence_noise * annealing * -torch.log(-torch.log(uniform))
    scores = scores.masked_fill(torch.arange(candidates.shape[1], device=device) >= remaining[:, None], float("-inf"))
    best = scores.topk(width, dim=1).indices
    return candidates.gather(1, best), drawn.gather(1, best)
