"""How likely a model finds the end of a sequence given its beginning.

An item is a list of ids, its BOS first, and the index of its first scored token: the tokens
before it (the BOS, a context) are always clean, the rest (a continuation) is scored. An
autoregressive model's score is exact. A diffusion model's is its ELBO over the continuation with
the context clean, estimated by Monte Carlo: pass p of an item draws t in the p-th of `passes`
equal strata (antithetic times) and hides each continuation token with probability 1 - alpha_t;
the hidden tokens' NLL given the visible ones is weighted by the schedule's weight at t. A PGM
predicts the hidden tokens from the clean set alone (`model.predict`: the context and the
visible continuation tokens are the clean set, the hidden ones the queries), an MDLM from the
sequence with them masked. What follows the item is unknown, not absent: a PGM never sees
unknown positions, and an MDLM sees them as masks up to its length, as when it samples (unless
`unknown_future=False`, the authors' harness: the MDLM sees the item alone).

Every item draws its noise from a generator seeded by the seed and the item's noise key (by
default its ids), so a score depends neither on the other items nor on the batching: rows of any
lengths are batched together, right-padded (a PGM's ragged clean sets, an MDLM's key-padding
mask; an AR model needs none). Items given the same key share their noise position by position
(common random numbers): the choices of a multiple-choice question keyed by their context differ
in score by less Monte-Carlo noise than their scores have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib
from collections.abc import Callable

import torch
from tqdm import tqdm

from ..errors import ArgumentError
from ..objectives.losses import token_nll
from ..objectives.text import Noise, sample_groups
from .perplexity import seed_for

Item = tuple[list[int], int]  # (ids, index of the first scored id)


@dataclasses.dataclass
class TextScore:
    """How likely a model finds one sequence (or continuation): `nll` nats summed over its
    `tokens` scored tokens (the ELBO, an upper bound, for PGM and MDLM; exact for AR), and the
    Monte-Carlo standard error of `nll` (0 when exact)."""

    nll: float
    tokens: int
    stderr: float = 0.0

    @property
    def nll_per_token(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)


def pass_noise(length: int, passes: int, t_min: float, generator: torch.Generator, positions: int) -> Noise:
    """The noise of an item's passes: times [passes], one in each equal stratum of [t_min, 1)
    from a single random offset, and a uniform per pass and position [passes, length], drawn for
    all `positions` of the model (so that items of different lengths share their first ones)."""
    offset = torch.rand((), generator=generator)
    t = (1 - t_min) * (offset + torch.arange(passes)) / passes + t_min
    return Noise(t, torch.rand(passes, positions, generator=generator)[:, :length])


def noise_key(ids: list[int]) -> int:
    """A stable number for a list of ids (Python's hash of strings changes between processes)."""
    return zlib.crc32(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())


def context_keys(items: list[Item]) -> list[int]:
    """Noise keys that make items with the same context (a question's choices) share their noise."""
    return [noise_key(ids[:first]) for ids, first in items]


@dataclasses.dataclass
class _Rows:
    """Rows to run: ids, which positions are hidden (predicted), and the time of each row."""

    ids: list[torch.Tensor] = dataclasses.field(default_factory=list)
    hidden: list[torch.Tensor] = dataclasses.field(default_factory=list)
    times: list[float] = dataclasses.field(default_factory=list)

    def add(self, ids: torch.Tensor, hidden: torch.Tensor, time: float) -> None:
        self.ids.append(ids)
        self.hidden.append(hidden)
        self.times.append(time)


@torch.no_grad()
def suffix_scores(model, objective, items: list[Item], *, passes: int = 1, seed: int = 0, batch_size: int = 32,
                  noise_keys: list[int] | None = None, unknown_future: bool = True, progress: bool = False,
                  device="cpu",
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                  ) -> list[TextScore]:
    """The `TextScore` of each item's continuation (see the module's doc), `batch_size` rows per
    model call, with a progress bar if `progress`. Reproducible for a given seed, whatever the
    batching."""
    _check_items(items)
    exact = model.config.kind == "ar"
    passes = 1 if exact else passes
    rows = _Rows()
    for index, (ids, first) in enumerate(items):
        ids_tensor = torch.tensor(ids, dtype=torch.long)
        context = torch.arange(len(ids)) < first
        if exact:
            rows.add(ids_tensor, ~context, 1.0)
            continue
        key = noise_key(ids) if noise_keys is None else noise_keys[index]
        noise = pass_noise(len(ids), passes, objective.t_min, torch.Generator().manual_seed(seed_for(seed, key)),
                           model.config.length)
        hidden = sample_groups(noise.t, (passes, len(ids)), always_clean=context.expand(passes, -1),
                               schedule=objective.schedule, u=noise.u)
        for p in range(passes):
            rows.add(ids_tensor, hidden[p], float(noise.t[p]))
    nll, _ = _run(model, objective, rows, batch_size, device, autocast, progress, unknown_future)
    if not exact:
        nll = nll * objective.schedule.weight(torch.tensor(rows.times, dtype=torch.float64))
    nll = nll.view(len(items), passes)
    means = nll.mean(1)
    errors = nll.std(1) / math.sqrt(passes) if passes > 1 else torch.zeros(len(items))
    return [TextScore(float(means[i]), len(ids) - first, float(errors[i])) for i, (ids, first) in enumerate(items)]


@torch.no_grad()
def greedy_suffixes(model, objective, items: list[Item], *, batch_size: int = 32, progress: bool = False, device="cpu",
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> list[bool]:
    """Whether each item's continuation is what the model would pick: every continuation token
    is the most likely one when the whole continuation is predicted at once from the context (a
    PGM's queries, an MDLM's masks, at t = 1), or token by token from the left (AR)."""
    _check_items(items)
    rows = _Rows()
    for ids, first in items:
        rows.add(torch.tensor(ids, dtype=torch.long), torch.arange(len(ids)) >= first, 1.0)
    _, correct = _run(model, objective, rows, batch_size, device, autocast, progress, unknown_future=True)
    return correct.tolist()


def _check_items(items: list[Item]) -> None:
    for number, (ids, first) in enumerate(items, 1):
        if not 1 <= first < len(ids):
            raise ArgumentError(f"item {number} scores from id {first} of {len(ids)}: the BOS is always given and at "
                                "least one id must be scored")


def _run(model, objective, rows: _Rows, batch_size: int, device, autocast, progress: bool, unknown_future: bool
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row: the summed NLL of its hidden tokens given the others [R] (float64), and
    whether each hidden token is the model's most likely one [R] (bool). Rows run longest first,
    so that a batch holds rows of similar lengths."""
    was_training = model.training
    model.eval()
    nll = torch.zeros(len(rows.ids), dtype=torch.float64)
    correct = torch.ones(len(rows.ids), dtype=torch.bool)
    order = sorted(range(len(rows.ids)), key=lambda r: -len(rows.ids[r]))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress, leave=False):
        chunk = order[start:start + batch_size]
        tokens = torch.nn.utils.rnn.pad_sequence([rows.ids[r] for r in chunk], batch_first=True).to(device)
        hidden = torch.nn.utils.rnn.pad_sequence([rows.hidden[r] for r in chunk], batch_first=True).to(device)
        lengths = torch.tensor([len(rows.ids[r]) for r in chunk], device=device)
        times = torch.tensor([rows.times[r] for r in chunk], device=device)
        with autocast():
            token_nlls, token_correct = _hidden_nll(model, objective, tokens, hidden, lengths, times, unknown_future)
        nll[chunk] = (token_nlls * hidden).sum(1).double().cpu()
        correct[chunk] = (token_correct | ~hidden).all(1).cpu()
    model.train(was_training)
    return nll, correct


def _hidden_nll(model, objective, tokens, hidden, lengths, times, unknown_future: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p(token) and whether it is the argmax, [B, L], at the hidden positions of right-padded
    rows (anything elsewhere). The mask token is never a prediction. `unknown_future`: an MDLM
    sees the positions after a row up to its length as masked (else a row is all it sees)."""
    config = model.config
    if config.kind == "ar":
        logits = model(tokens[:, :-1], check_inputs=False)
        first = torch.zeros_like(tokens[:, :1], dtype=torch.float32)
        return (torch.cat([first, token_nll(logits, tokens[:, 1:], config.mask_token_id)], 1),
                torch.cat([first.bool(), _argmax(logits, config) == tokens[:, 1:]], 1))
    cond = objective.schedule.sigma(times) if config.time_conditioning else None
    if config.kind == "pgm":
        valid = torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]
        clean, queries = _packed(valid & ~hidden), _packed(hidden)
        if queries.shape[1] == 0:
            return torch.zeros_like(tokens, dtype=torch.float32), torch.ones_like(hidden)
        clean_count = (valid & ~hidden).sum(1)
        ragged = bool((clean_count != clean_count[0]).any())
        logits = model.predict(tokens.gather(1, clean), clean, queries, clean_count if ragged else None, cond,
                               check_inputs=False)
        targets = tokens.gather(1, queries)
        nll = torch.zeros_like(tokens, dtype=torch.float32).scatter(
            1, queries, token_nll(logits, targets, config.mask_token_id))
        right = torch.zeros_like(hidden).scatter(1, queries, _argmax(logits, config) == targets)
        # A row with fewer queries than the widest repeats a visible position; those entries are
        # overwritten by the row's own hidden positions or ignored (not hidden).
        return nll, right
    noisy = torch.where(hidden, config.mask_token_id, tokens)
    if unknown_future:
        future = torch.arange(config.length, device=tokens.device) >= lengths[:, None]
        noisy = torch.cat([noisy, noisy.new_zeros(len(noisy), config.length - noisy.shape[1])], 1)
        noisy = noisy.masked_fill(future, config.mask_token_id)
        states, cond_vector = model.encode(noisy, cond, check_inputs=False)
        states = states[:, :tokens.shape[1]]
    else:
        ragged = bool((lengths != tokens.shape[1]).any())
        states, cond_vector = model.encode(noisy, cond, lengths=lengths if ragged else None, check_inputs=False)
    logits = model.logits_at(states, cond_vector, hidden)  # [hidden tokens, V]
    targets = tokens[hidden]
    nll = torch.zeros_like(tokens, dtype=torch.float32)
    nll[hidden] = token_nll(logits, targets, config.mask_token_id)
    right = torch.zeros_like(hidden)
    right[hidden] = _argmax(logits, config) == targets
    return nll, right


def _packed(members: torch.Tensor) -> torch.Tensor:
    """Positions [B, N] of each row's members in increasing order, N = the most members of a row;
    shorter rows are filled with non-member positions."""
    order = torch.sort((~members).to(torch.int8), dim=1, stable=True).indices
    return order[:, :int(members.sum(1).max())]


def _argmax(logits: torch.Tensor, config) -> torch.Tensor:
    return logits.float().index_fill(-1, torch.tensor([config.mask_token_id], device=logits.device),
                                     float("-inf")).argmax(-1)


def score_sequences(model, objective, sequences: list[list[int]], *, passes: int = 1, seed: int = 0,
                    batch_size: int = 32, device="cpu",
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                    ) -> list[TextScore]:
    """The NLL of each id sequence, its first id (the BOS) given and not scored: `suffix_scores`
    with an empty context, of the sequence alone (nothing after it)."""
    return suffix_scores(model, objective, [(ids, 1) for ids in sequences], passes=passes, seed=seed,
                         batch_size=batch_size, unknown_future=False, device=device, autocast=autocast)
