"""What the samplers share: the known-token inputs, the per-step decoding counts, and the
updates a sampling loop yields after each step."""

from __future__ import annotations

import dataclasses
from collections.abc import Generator

import torch

from ..errors import SamplingError
from ..objectives.schedules import LogLinearSchedule, arccos_share


@dataclasses.dataclass
class StepUpdate:
    """What one sampling step committed, for whoever watches the loop (a progress display, a UI).

    Either as columns: row b set `tokens[b, j]` at `positions[b, j]` for every j where `valid[b, j]`
    (`valid` None: every j); or as a mask: row b set `state[b, p]` at every p where `mask[b, p]`.
    The tensors are the sampler's own, not copies: read them before asking for the next step."""

    step: int
    positions: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    state: torch.Tensor | None = None

    def committed(self) -> list[list[tuple[int, int]]]:
        """(position, token) pairs per row, in position order."""
        if self.mask is not None:
            return [[(p, t) for p, t, m in zip(range(len(row)), row, kept) if m]
                    for row, kept in zip(self.state.tolist(), self.mask.tolist())]
        valid = self.valid.tolist() if self.valid is not None else None
        rows = []
        for b, (positions, tokens) in enumerate(zip(self.positions.tolist(), self.tokens.tolist())):
            pairs = zip(positions, tokens) if valid is None else (pt for pt, v in zip(zip(positions, tokens), valid[b])
                                                                   if v)
            rows.append(sorted(pairs))
        return rows


def run_to_end(steps: Generator) -> torch.Tensor:
    """Run a sampling loop (a generator of `StepUpdate`s) to its end and return its result."""
    try:
        while True:
            next(steps)
    except StopIteration as stop:
        return stop.value


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def resolve_known(config, num_samples, length, known_tokens, known_mask, device):
    """Known tokens and their mask [B, L] on `device`, built empty when none are given."""
    if (known_tokens is None) != (known_mask is None):
        raise SamplingError("known_tokens and known_mask must be given together")
    if known_tokens is None:
        if num_samples is None:
            raise SamplingError("give num_samples, or known_tokens and known_mask")
        length = config.length if length is None else length
        if num_samples < 1 or length < 1:
            raise SamplingError(f"num_samples and length must be positive, got {num_samples} and {length}")
        return (torch.zeros(num_samples, length, dtype=torch.long, device=device),
                torch.zeros(num_samples, length, dtype=torch.bool, device=device))
    if known_tokens.dim() != 2 or known_mask.shape != known_tokens.shape:
        raise SamplingError(f"known_tokens and known_mask must both be [batch, length], got "
                            f"{tuple(known_tokens.shape)} and {tuple(known_mask.shape)}")
    if num_samples is not None and num_samples != known_tokens.shape[0]:
        raise SamplingError(f"num_samples {num_samples} disagrees with known_tokens' batch {known_tokens.shape[0]}")
    if length is not None and length != known_tokens.shape[1]:
        raise SamplingError(f"length {length} disagrees with known_tokens' length {known_tokens.shape[1]}")
    return known_tokens.to(device, torch.long), known_mask.to(device, torch.bool)


def check_known(config, known_tokens, known_mask, steps) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise SamplingError(f"steps must be a positive integer, got {steps!r}")
    length = known_tokens.shape[1]
    if length > config.length:
        raise SamplingError(f"cannot generate {length} tokens with a model of length {config.length}")
    values = known_tokens[known_mask]
    if values.numel():
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= config.vocab_size:
            raise SamplingError(f"known token id {low if low < 0 else high} is outside [0, {config.vocab_size})")
        if bool((values == config.mask_token_id).any()):
            raise SamplingError(f"a known token is the mask id {config.mask_token_id}")


def arccos_bounds(total: torch.Tensor, steps: int) -> torch.Tensor:
    """Cumulative counts [S + 1, ...] of the arccos schedule (Halton-MaskGIT's and the authors'
    image samplers): after step i, min(R, max(i + 1, floor(R (1 - arccos((i + 1) / S) / (pi / 2)))))
    of R positions are decoded. Few tokens early, most at the end; at least one per step while any
    are left. Float64, so the floors are exact for the published test vectors."""
    fractions = torch.arange(steps + 1, dtype=torch.float64, device=total.device) / steps
    shares = 1 - arccos_share(fractions)  # decoded, not hidden
    total = total.to(torch.float64)
    bounds = torch.floor(total * shares.view(-1, *([1] * total.dim())))
    at_least = torch.arange(steps + 1, dtype=torch.float64, device=total.device).view(-1, *([1] * total.dim()))
    return torch.minimum(torch.maximum(bounds, at_least), total).long()


class StepCounts:
    """How many positions each row decodes at each step.

    "uniform": row b spreads its R_b unknown positions as evenly as possible,
    floor((i+1) R_b / S) - floor(i R_b / S) at step i. "arccos": the image samplers' schedule
    (`arccos_bounds`). When every row has the same R, counts are plain ints and the sampler needs
    no padding, masks or host synchronisation.
    "binomial": Binomial(left_b, p_i) with p_i MDLM's reveal probability between the times
    1 - i/S and 1 - (i+1)/S (p = 1 at the last step, so nothing is left).
    """

    MODES = ("uniform", "arccos", "binomial")

    def __init__(self, num_known: torch.Tensor, length: int, steps: int, mode: str,
                 generator: torch.Generator | None, schedule: LogLinearSchedule = LogLinearSchedule()):
        if mode not in self.MODES:
            raise SamplingError(f"counts must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.mode, self.steps, self.generator, self.schedule = mode, steps, generator, schedule
        remaining = length - num_known
        equal = bool((num_known == num_known[0]).all())
        if mode == "binomial":
            self.initial_clean = num_known.clone()
            self.left = remaining.clone()
            return
        if equal:
            remaining = remaining[:1]
        if mode == "uniform":
            bounds = torch.arange(steps + 1, device=num_known.device)[:, None] * remaining // steps
        else:
            bounds = arccos_bounds(remaining, steps)
        plan = bounds[1:] - bounds[:-1]  # [S, B or 1]
        if equal:
            self.initial_clean = length - int(remaining[0])
            self.plan = self.widths = plan[:, 0].tolist()
        else:
            self.initial_clean = num_known.clone()
            self.plan = plan
            self.widths = plan.max(dim=1).values.tolist()

    def next(self, step: int):
        """(count per row: int or [B] tensor, the widest row's count as an int)."""
        if self.mode != "binomial":
            return self.plan[step], self.widths[step]
        t, s = 1 - step / self.steps, 1 - (step + 1) / self.steps
        p = self.schedule.reveal_probability(t, s)
        if p >= 1:
            k = self.left.clone()
        else:
            probability = torch.full(self.left.shape, p, dtype=torch.float, device=self.left.device)
            k = torch.binomial(self.left.float(), probability, generator=self.generator).long()
        self.left -= k
        return k, int(k.max())
