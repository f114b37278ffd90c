"""The arithmetic of Self-Distillation Through Time (SDTT; Deschenaux & Gulcehre), as the PGM
paper uses it: a student learns to take in one step what its teacher takes in
`num_distill_steps` ancestral steps of size dt.

At a time t the student sees x_t (each token hidden with probability 1 - alpha_t, as in
training) and predicts every hidden token once. The teacher starts from the same x_t and takes
its steps at the evenly spaced times t, t - dt, ..., t - n dt (clamped at 0: a step that reaches
0 reveals everything left); a token revealed at its k-th step is supervised by the teacher's
prediction at that step, and a token still hidden after the last step by the last prediction.
The authors' code places the times at t * linspace(1, 0, n) + (1 - t) * t_end, which is not
the interpolation its comment describes (for t = 0.5 and two steps it gives about 0.749 and
0.249); the paper's evenly spaced times are used here.

The divergence between the student's and the teacher's distributions at each hidden token is
one of DIVERGENCES, in float32: "kl-bwd" KL(student || teacher) (the authors' default),
"kl-fwd" KL(teacher || student), "tv" the total variation distance, "mse" the mean squared
difference of the log-probabilities.

The randomness of one loss (the time, which tokens are hidden, when the teacher reveals each
and what it draws) is drawn up front for the whole global batch (`DistillNoise`), so that any
split of the batch over processes and micro-batches computes the same loss.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError
from .text import draw_noise

DIVERGENCES = ("kl-bwd", "kl-fwd", "tv", "mse")
# The log-probability given to suppressed ids (the mask token): exp() of it is 0, as for -inf, but
# differences of two of them are 0 instead of NaN, which keeps every gradient finite.
SUPPRESSED_LOG_PROB = -1e30


@dataclasses.dataclass
class DistillNoise:
    """t [B]; hide [B, L]: a token is hidden at t where hide < 1 - alpha_t; reveal [B, n, L]: the
    teacher reveals a hidden token at its step k where reveal[:, k] is below that step's reveal
    probability; draw [B, L]: the uniform that locates a revealed token in the teacher's
    distribution (a token is revealed at most once)."""

    t: torch.Tensor
    hide: torch.Tensor
    reveal: torch.Tensor
    draw: torch.Tensor

    def __getitem__(self, rows) -> "DistillNoise":
        return DistillNoise(self.t[rows], self.hide[rows], self.reveal[rows], self.draw[rows])

    def to(self, device) -> "DistillNoise":
        return DistillNoise(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def draw_distill_noise(batch_size: int, length: int, teacher_steps: int, *, t_min: float = 1e-3,
                       generator: torch.Generator | None = None) -> DistillNoise:
    """The noise of one distillation loss: antithetic times in [t_min, 1), as in training."""
    training = draw_noise(batch_size, length, t_min=t_min, generator=generator)
    reveal = torch.rand(batch_size, teacher_steps, length, generator=generator)
    draw = torch.rand(batch_size, length, generator=generator, dtype=torch.float64)
    return DistillNoise(training.t, training.u, reveal, draw)


def teacher_times(t: torch.Tensor, dt: float, steps: int) -> torch.Tensor:
    """[B, steps + 1]: t, t - dt, ..., t - steps * dt, clamped at 0."""
    offsets = dt * torch.arange(steps + 1, dtype=t.dtype, device=t.device)
    return (t[:, None] - offsets).clamp(min=0)


def distribution_log_probs(logits: torch.Tensor, suppressed_id: int) -> torch.Tensor:
    """Float32 log-probabilities [..., V] without `suppressed_id` (see SUPPRESSED_LOG_PROB)."""
    suppressed = torch.tensor([suppressed_id], device=logits.device)
    log_probs = logits.float().index_fill(-1, suppressed, float("-inf")).log_softmax(-1)
    return log_probs.index_fill(-1, suppressed, SUPPRESSED_LOG_PROB)


def divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token divergence [N] between log-probabilities student, teacher [N, V] (float32)."""
    if kind == "kl-bwd":
        return (student.exp() * (student - teacher)).sum(-1)
    if kind == "kl-fwd":
        return (teacher.exp() * (teacher - student)).sum(-1)
    if kind == "tv":
        return 0.5 * (student.exp() - teacher.exp()).abs().sum(-1)
    if kind == "mse":
        kept = (student > SUPPRESSED_LOG_PROB).sum(-1)
        return (student - teacher).square().sum(-1) / kept
    raise ConfigError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {kind!r}")
