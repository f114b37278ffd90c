"""Quantities pinned to closed forms or hand computations, so that a wrong probability, a swapped
term or the wrong estimator cannot pass: the binomial step counts and MDLM's reveal rate, the
evaluation ELBO against the training loss, and the antithetic times of a score."""

import math

import pytest
import torch
from conftest import redraw_zero_initialised, tiny_mdlm, tiny_pgm

from pgm.eval.likelihood import pass_noise
from pgm.eval.perplexity import seed_for, validation_elbo
from pgm.objectives import LogLinearSchedule, Noise, PartitionObjective
from pgm.sampling import iterate_mdlm
from pgm.sampling.common import StepCounts


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.2])
@pytest.mark.parametrize("steps", [1, 2, 5, 8])
def test_the_reveal_probability_is_one_over_the_steps_left(eps, steps):
    # Between t_i = 1 - i/S and s = 1 - (i+1)/S: (alpha_s - alpha_t) / (1 - alpha_t) with
    # alpha = 1 - (1 - eps) t, which is (1 - eps) / S / ((1 - eps) t_i) = 1 / (S - i), whatever eps.
    schedule = LogLinearSchedule(eps=eps)
    for i in range(steps):
        assert schedule.reveal_probability(1 - i / steps, 1 - (i + 1) / steps) == pytest.approx(1 / (steps - i))


@pytest.mark.parametrize("eps", [1e-3, 0.2])
@pytest.mark.parametrize("steps,remaining", [(2, 20), (5, 20), (8, 13)])
def test_binomial_step_counts_have_the_multinomial_moments(eps, steps, remaining):
    # Each of R hidden tokens is revealed at step i with probability 1/S (the product of the
    # conditional rates 1/(S - j)), so the count of step i is Binomial(R, 1/S) and they sum to R.
    rows = 20000
    counts = StepCounts(torch.full((rows,), 4), 4 + remaining, steps, "binomial", torch.Generator().manual_seed(0),
                        LogLinearSchedule(eps=eps))
    drawn = torch.stack([counts.next(i)[0] for i in range(steps)], dim=1).double()  # [rows, S]
    assert torch.equal(drawn.sum(1), torch.full((rows,), float(remaining), dtype=torch.float64))
    p = 1 / steps
    mean, variance = remaining * p, remaining * p * (1 - p)
    for i in range(steps):
        column = drawn[:, i]
        assert abs(float(column.mean()) - mean) < 5 * math.sqrt(variance / rows) + 1e-9, (i, float(column.mean()))
        assert abs(float(column.var()) - variance) < 0.05 * variance + 1e-9, (i, float(column.var()))


@pytest.mark.parametrize("steps", [2, 5])
def test_mdlm_reveals_each_masked_token_with_one_over_the_steps_left(steps):
    model = tiny_mdlm()
    rows, length = 600, 20
    per_step = torch.zeros(steps, rows)
    for update in iterate_mdlm(model, num_samples=rows, length=length, steps=steps,
                               generator=torch.Generator().manual_seed(1)):
        per_step[update.step] = update.mask.sum(1).float()
    p = 1 / steps  # marginally, see the test above
    mean, variance = length * p, length * p * (1 - p)
    assert torch.equal(per_step.sum(0), torch.full((rows,), float(length)))
    for i in range(steps):
        assert abs(float(per_step[i].mean()) - mean) < 5 * math.sqrt(variance / rows), (i, per_step[i].mean())
        if variance:
            assert abs(float(per_step[i].var()) - variance) < 0.25 * variance, (i, per_step[i].var())


def hand_nll(logits: torch.Tensor, tokens: torch.Tensor, mask_id: int) -> torch.Tensor:
    """-log softmax over every id but the mask id, at the target, in float64 (the mask id is never a target)."""
    logits = logits.double()
    keep = torch.ones(logits.shape[-1], dtype=torch.bool)
    keep[mask_id] = False
    log_normaliser = torch.logsumexp(logits[..., keep], dim=-1)
    return log_normaliser - logits.gather(-1, tokens[..., None])[..., 0]


def test_evaluation_elbo_and_training_loss_against_a_hand_computation():
    model = tiny_pgm()  # its output layer is redrawn: predictions are far from uniform
    objective = PartitionObjective()
    eps = objective.schedule.eps
    tokens = torch.randint(0, 40, (6, 20), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
    noise = Noise(t, torch.rand(6, 20, generator=torch.Generator().manual_seed(1)))
    always_clean = torch.zeros(6, 20, dtype=torch.bool)
    always_clean[:, 0] = True
    groups = (noise.u < ((1 - eps) * t)[:, None]) & ~always_clean  # group 1: hidden with probability 1 - alpha_t
    assert groups.any() and (~groups[:, 1:]).any()
    with torch.no_grad():
        nll = hand_nll(model(tokens, groups), tokens, 40)
    scored = ~always_clean
    s = 1 / (1 - eps) - t  # the complementary time: 1 - alpha_s = alpha_t
    elbo = (nll / t[:, None] * groups).sum() / scored.sum()
    loss = 0.5 * (nll * torch.where(groups, 1 / t[:, None], 1 / s[:, None]) * scored).sum() / scored.sum()
    with torch.no_grad():
        ours_elbo = objective.elbo(model, tokens, always_clean=always_clean, noise=noise)
        ours_loss = objective.loss(model, tokens, always_clean=always_clean, noise=noise)
    assert float(ours_elbo.nll_sum / ours_elbo.tokens) == pytest.approx(float(elbo), rel=1e-5)
    assert float(ours_loss.loss) == pytest.approx(float(loss), rel=1e-5)
    assert abs(float(elbo) - float(loss)) > 0.05 * float(elbo)  # the two estimators are told apart


class Rows:
    """Validation rows as `validation_elbo` reads them."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, indices):
        return self.tokens[list(indices)], None

    def labels_of(self, indices):
        return None

    def given_of(self, indices):
        return None


def test_validation_scores_the_evaluation_elbo_not_the_training_loss():
    model, objective = tiny_pgm(), PartitionObjective()
    tokens = torch.randint(0, 40, (5, 20), generator=torch.Generator().manual_seed(2))
    result = validation_elbo(model, objective, Rows(tokens), batch_size=8, seed=3)
    # validation_elbo draws the noise of its first batch from seed_for(seed, pass, batch).
    noise = objective.draw_noise(5, 20, generator=torch.Generator().manual_seed(seed_for(3, 0, 0)))
    always_clean = torch.zeros(5, 20, dtype=torch.bool)
    always_clean[:, 0] = True
    groups = (noise.u < ((1 - objective.schedule.eps) * noise.t)[:, None]) & ~always_clean
    with torch.no_grad():
        nll = hand_nll(model(tokens, groups), tokens, 40)
    expected = float((nll / noise.t[:, None] * groups).sum() / (5 * 19))
    assert result.nll == pytest.approx(expected, rel=1e-5) and result.tokens == 5 * 19


def test_validation_builds_no_autograd_graph():
    model, objective = tiny_pgm(), PartitionObjective()
    grad_enabled = []
    model.register_forward_pre_hook(lambda module, inputs: grad_enabled.append(torch.is_grad_enabled()))
    validation_elbo(model, objective, Rows(torch.randint(0, 40, (5, 20))), batch_size=2)
    assert grad_enabled == [False] * 3


def test_score_passes_draw_one_time_per_stratum():
    t_min = PartitionObjective().t_min
    times = [pass_noise(4, 5, t_min, torch.Generator().manual_seed(seed), 20).t for seed in range(3)]
    for seed, t in enumerate(times):
        strata = ((t - t_min) / (1 - t_min) * 5).floor()
        assert torch.equal(strata, torch.arange(5.0)) and bool((t >= t_min).all())
        offset = float(torch.rand((), generator=torch.Generator().manual_seed(seed)))  # the first draw
        expected = [t_min + (1 - t_min) * (offset + p) / 5 for p in range(5)]
        assert t.tolist() == pytest.approx(expected, abs=1e-7)
    assert not torch.equal(times[0], times[1])  # each item draws its own offset


def test_redrawn_models_are_not_uniform():
    # The hand computations above rely on it: a uniform model would give the ELBO and the loss the same value.
    model = redraw_zero_initialised(tiny_pgm())
    with torch.no_grad():
        logits = model(torch.zeros(1, 20, dtype=torch.long), torch.zeros(1, 20, dtype=torch.bool))
    assert float(logits.std()) > 0.1
