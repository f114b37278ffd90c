import math

import pytest
import torch

from pgm.models import MaskedDiffusionConfig, MaskedDiffusionTransformer, PartitionConfig, PartitionTransformer
from pgm.objectives import (LogLinearSchedule, MaskedDiffusionObjective, Noise, PartitionObjective, sample_groups,
                            sample_times, token_nll)

VOCAB = 33


def uniform_pgm():
    # A fresh model's output layer is zero, so its logits are uniform over the non-mask ids.
    return PartitionTransformer(PartitionConfig(vocab_size=VOCAB, length=24, hidden_size=16, num_heads=2,
                                                encoder_blocks=1, decoder_blocks=1, cond_dim=8, dropout=0.0))


def uniform_mdlm():
    return MaskedDiffusionTransformer(MaskedDiffusionConfig(vocab_size=VOCAB, length=24, hidden_size=16, num_heads=2,
                                                            blocks=1, cond_dim=8, dropout=0.0))


def monte_carlo(estimate, passes=40):
    values = torch.tensor([float(estimate(seed)) for seed in range(passes)])
    return values.mean().item(), values.std().item() / math.sqrt(passes)


@pytest.mark.parametrize("make_model,make_objective,method", [
    (uniform_pgm, PartitionObjective, "elbo"),
    (uniform_pgm, PartitionObjective, "loss"),
    (uniform_mdlm, MaskedDiffusionObjective, "elbo"),
])
def test_uniform_model_elbo_is_one_minus_eps_log_v_minus_one(make_model, make_objective, method):
    model, objective = make_model(), make_objective()
    tokens = torch.randint(0, VOCAB - 1, (64, 24), generator=torch.Generator().manual_seed(0))

    def estimate(seed):
        with torch.no_grad():
            out = getattr(objective, method)(model, tokens, generator=torch.Generator().manual_seed(seed))
        return out.nll_sum / out.tokens

    mean, stderr = monte_carlo(estimate)
    expected = (1 - objective.schedule.eps) * math.log(VOCAB - 1)
    assert abs(mean - expected) < 4 * stderr + 1e-3, (mean, expected, stderr)
    assert abs(mean - expected) / expected < 0.03


def test_complementary_time_matches_the_swapped_views_masking_rate():
    schedule = LogLinearSchedule(eps=1e-3)
    t = torch.linspace(1e-3, 0.999, 101, dtype=torch.float64)
    s = schedule.complement(t)
    assert torch.allclose(1 - schedule.alpha(s), schedule.alpha(t))
    assert torch.allclose(s, 1 - t, atol=2e-3)
    assert float(schedule.weight(s).max()) <= (1 - 1e-3) / 1e-3 + 1e-6


def test_antithetic_times_put_one_time_in_each_stratum():
    t = sample_times(8, t_min=0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal((t * 8).floor(), torch.arange(8.0))
    t = sample_times(1000, t_min=1e-3, generator=torch.Generator().manual_seed(3))
    assert float(t.min()) >= 1e-3 and float(t.max()) < 1


def test_group_one_share_follows_one_minus_alpha():
    t = torch.tensor([0.1, 0.5, 0.9])
    groups = sample_groups(t, (3, 20000), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(groups.float().mean(1), 1 - LogLinearSchedule().alpha(t), atol=0.01)
    always_clean = torch.zeros(3, 20000, dtype=torch.bool)
    always_clean[:, 0] = True
    assert not sample_groups(torch.ones(3) * 0.999, (3, 20000), always_clean=always_clean)[:, 0].any()


@pytest.mark.parametrize("group", [0, 1])
def test_single_group_inputs_give_finite_loss_and_gradients(group):
    model = uniform_pgm().train()
    tokens = torch.randint(0, VOCAB - 1, (4, 24))
    t = torch.full((4,), 0.999 if group else 0.001)
    # At these extremes a fixed seed makes every token land in one group; check that it did.
    generator = torch.Generator().manual_seed(0)
    groups = sample_groups(t, tokens.shape, generator=generator)
    assert bool((groups == bool(group)).all())
    noise = Noise(t, torch.rand(tokens.shape, generator=torch.Generator().manual_seed(0)))
    out = PartitionObjective().loss(model, tokens, noise=noise)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_token_nll_ignores_the_mask_logit_and_runs_in_float32():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 50.0]]], dtype=torch.bfloat16)
    nll = token_nll(logits, torch.tensor([[1]]), suppressed_id=3)
    assert nll.dtype == torch.float32
    assert torch.allclose(nll, torch.tensor([[math.log(3)]]))


def test_padding_and_given_tokens_are_not_scored():
    model, objective = uniform_pgm(), PartitionObjective()
    tokens = torch.randint(0, VOCAB - 1, (2, 24))
    valid = torch.ones(2, 24, dtype=torch.bool)
    valid[:, 20:] = False
    always_clean = torch.zeros(2, 24, dtype=torch.bool)
    always_clean[:, 0] = True
    out = objective.elbo(model, tokens, valid=valid, always_clean=always_clean)
    assert int(out.tokens) == 2 * 19
