"""Validation perplexity of diffusion models: an ELBO, estimated by Monte Carlo.

Each pass draws fresh (antithetic) times and partitions for every validation row with a
generator seeded by (seed, pass, batch), so a result is reproducible and does not depend on
how many processes share the work. The standard error is the Monte-Carlo error of the mean over
passes, estimated row by row: SE^2 = sum_i Var_p(nll_pi) / P / tokens^2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from ..objectives.losses import always_clean_mask


@dataclasses.dataclass
class ValidationResult:
    nll: float  # nats per token (an upper bound on the true NLL for diffusion models)
    stderr: float  # Monte-Carlo standard error of `nll`
    tokens: int  # scored tokens per pass
    passes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def perplexity_stderr(self) -> float:
        return self.perplexity * self.stderr


def seed_for(*parts: int) -> int:
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + 1442695040888963407) % (1 << 63)
    return value


def rank_parts(size: int, rank: int, world_size: int, micro_batch_size: int = 0,
               lockstep: bool = False) -> Iterator[tuple[slice, bool]]:
    """The slices of a batch of `size` rows that process `rank` scores, `micro_batch_size` (0: all
    of its share) at a time, each with whether it is kept; with `lockstep` every process gets as
    many slices as the largest share needs, the missing ones a stand-in (the batch's first row,
    not kept)."""
    first, last = rank * size // world_size, (rank + 1) * size // world_size
    largest = -(-size // world_size)
    step = micro_batch_size or max(1, largest if lockstep else last - first)
    calls = -(-largest // step) if lockstep else -(-(last - first) // step)
    for call in range(calls):
        low = first + call * step
        if low < last:
            yield slice(low, min(low + step, last)), True
        else:
            yield slice(0, 1), False


@torch.no_grad()
def validation_elbo(model, objective, rows, *, indices=None, batch_size: int = 32, micro_batch_size: int = 0,
                    passes: int = 1, seed: int = 0, device="cpu",
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    bos_always_clean: bool = True, rank: int = 0, world_size: int = 1,
                    lockstep: bool = False) -> ValidationResult:
    """ELBO over `rows[indices]` (all rows by default), in batches of `batch_size` rows whose
    noise is drawn together. With world_size > 1 each process scores its share of every batch,
    `micro_batch_size` rows at a time, and the sums are all-reduced; with `lockstep` every process
    calls the model equally often (a sharded model gathers its parameters in each call), a short
    share scoring a stand-in row whose result is dropped. `autocast` makes the context manager
    the model runs under."""
    indices = list(range(len(rows))) if indices is None else list(indices)
    was_training = model.training
    model.eval()
    row_nll = torch.zeros(passes, len(indices), dtype=torch.float64)
    row_tokens = torch.zeros(len(indices), dtype=torch.float64)
    for p in range(passes):
        for b, start in enumerate(range(0, len(indices), batch_size)):
            chunk = indices[start:start + batch_size]
            tokens, valid = rows[chunk]
            generator = torch.Generator().manual_seed(seed_for(seed, p, b))
            noise = objective.draw_noise(len(chunk), tokens.shape[1], generator=generator)
            for part, kept in rank_parts(len(chunk), rank, world_size, micro_batch_size, lockstep):
                part_tokens = tokens[part].to(device)
                part_valid = None if valid is None else valid[part].to(device)
                given = rows.given_of(chunk[part])
                always_clean = always_clean_mask(part_tokens, given, bos_always_clean)
                labels = rows.labels_of(chunk[part])
                labeled = {} if labels is None else {"labels": labels.to(device)}
                with autocast():
                    out = objective.elbo(model, part_tokens, valid=part_valid, always_clean=always_clean,
                                         noise=None if noise is None else noise[part].to(device), **labeled)
                if kept:
                    positions = torch.arange(start + part.start, start + part.stop)
                    row_nll[p, positions] = out.row_nll.double().cpu()
                    row_tokens[positions] = out.row_tokens.double().cpu()
    if world_size > 1:
        dist.all_reduce(row_nll)
        dist.all_reduce(row_tokens)
    model.train(was_training)
    total_tokens = float(row_tokens.sum())
    nll = float(row_nll.sum()) / passes / total_tokens
    stderr = float("nan")
    if passes > 1:
        stderr = math.sqrt(float(row_nll.var(dim=0).sum()) / passes) / total_tokens
    return ValidationResult(nll=nll, stderr=stderr, tokens=int(total_tokens), passes=passes)
