"""Conditional log-likelihoods (pgm.eval.likelihood): the ELBO over a continuation with its context
clean, pinned to the training view, to closed forms and to hand computations."""

import math

import pytest
import torch
from conftest import redraw_zero_initialised, tiny_mdlm, tiny_pgm

from pgm.eval.likelihood import greedy_suffixes, noise_key, pass_noise, suffix_scores
from pgm.eval.perplexity import seed_for
from pgm.models import CausalConfig, CausalTransformer
from pgm.objectives import objective_for

ITEMS = [([0, 5, 6, 7, 8, 9, 10], 3), ([0, 11, 12, 13], 1), ([0, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], 9),
         ([0, 24, 25, 26, 27], 2)]


def tiny_ar():
    torch.manual_seed(0)
    return redraw_zero_initialised(CausalTransformer(CausalConfig(vocab_size=41, length=20, hidden_size=32, num_heads=4,
                                                                  blocks=2, cond_dim=16, dropout=0.0))).eval()


MODELS = {"pgm": tiny_pgm, "mdlm": tiny_mdlm, "ar": tiny_ar}


def hand_nll(logits, targets, mask_id):
    logits = logits.clone()
    logits[..., mask_id] = float("-inf")
    return -logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]


@pytest.mark.parametrize("kind", ["pgm", "mdlm"])
def test_the_conditional_elbo_is_the_training_view_elbo_with_the_context_clean(kind):
    # The scorer runs `predict` (PGM) or a padded batch (MDLM); objective.elbo runs the training view.
    model = MODELS[kind]()
    objective = objective_for(model)
    ids, first, passes = ITEMS[0][0], ITEMS[0][1], 16
    [score] = suffix_scores(model, objective, [(ids, first)], passes=passes, seed=3, unknown_future=False)
    generator = torch.Generator().manual_seed(seed_for(3, noise_key(ids)))
    noise = pass_noise(len(ids), passes, objective.t_min, generator, model.config.length)
    context = torch.zeros(passes, len(ids), dtype=torch.bool)
    context[:, :first] = True
    with torch.no_grad():
        reference = objective.elbo(model, torch.tensor(ids).expand(passes, -1), always_clean=context, noise=noise)
    assert score.nll == pytest.approx(float(reference.row_nll.double().mean()), rel=1e-5)
    assert score.tokens == len(ids) - first == int(reference.row_tokens[0])
    assert score.stderr == pytest.approx(float(reference.row_nll.double().std() / math.sqrt(passes)), rel=1e-4)


@pytest.mark.parametrize("kind, unknown_future", [("pgm", True), ("mdlm", True), ("mdlm", False), ("ar", True)])
def test_scores_do_not_depend_on_the_batch(kind, unknown_future):
    model = MODELS[kind]()
    objective = objective_for(model)
    together = suffix_scores(model, objective, ITEMS, passes=5, seed=1, batch_size=7, unknown_future=unknown_future)
    for item, score in zip(ITEMS, together):
        [alone] = suffix_scores(model, objective, [item], passes=5, seed=1, batch_size=1,
                                unknown_future=unknown_future)
        assert alone.nll == pytest.approx(score.nll, rel=1e-5, abs=1e-5)
        assert alone.stderr == pytest.approx(score.stderr, rel=1e-4, abs=1e-5)
    greedy = greedy_suffixes(model, objective, ITEMS, batch_size=3)
    assert greedy == [g for item in ITEMS for g in greedy_suffixes(model, objective, [item], batch_size=1)]


def conditional_nll(model, ids, hidden, future: bool):
    """-log p of the hidden positions, each given the visible ones, computed from scratch: the full
    training-view forward of a PGM (the hidden positions in group 1), an MDLM's forward with the
    hidden positions (and, with `future`, every position after the item) masked."""
    tokens = torch.tensor([ids])
    hidden = torch.tensor([hidden])
    with torch.no_grad():
        if model.config.kind == "pgm":
            logits = model(tokens, hidden)
        else:
            noisy = torch.where(hidden, model.config.mask_token_id, tokens)
            if future:
                pad = torch.full((1, model.config.length - len(ids)), model.config.mask_token_id)
                noisy = torch.cat([noisy, pad], 1)
            logits = model(noisy)[:, :len(ids)]
    return hand_nll(logits, tokens, model.config.mask_token_id)[0]


@pytest.mark.parametrize("kind, future", [("pgm", True), ("mdlm", True), ("mdlm", False)])
def test_the_elbo_of_two_tokens_is_its_closed_form(kind, future):
    # Continuation (x, y) after a clean context; each is hidden with probability q = (1 - eps) t and
    # weighted by 1/t. With a = NLL of a token given the other, b = NLL with both hidden, and t uniform
    # on [t_min, 1): E = sum over the two of (1 - eps) [a (1 - (1 - eps) E[t]) + b (1 - eps) E[t]].
    model = MODELS[kind]()
    objective = objective_for(model)
    ids = [0, 5, 6, 7, 8, 30, 31]
    first = 5
    eps, mean_t = objective.schedule.eps, (1 + objective.t_min) / 2
    base = [False] * first
    alone_x = conditional_nll(model, ids, base + [True, False], future)[5]
    alone_y = conditional_nll(model, ids, base + [False, True], future)[6]
    both = conditional_nll(model, ids, base + [True, True], future)
    expected = sum((1 - eps) * (a * (1 - (1 - eps) * mean_t) + b * (1 - eps) * mean_t)
                   for a, b in ((alone_x, both[5]), (alone_y, both[6])))
    [score] = suffix_scores(model, objective, [(ids, first)], passes=2000, seed=0, unknown_future=future)
    assert abs(score.nll - float(expected)) < 4 * score.stderr, (score, float(expected))
    assert score.stderr < 0.05 * float(expected)  # the test has power


def test_the_monte_carlo_spread_shrinks_with_more_samples():
    # The spread of the estimate over seeds falls like 1/sqrt(samples) (antithetic strata do better),
    # and the reported standard error tracks it.
    model = tiny_pgm()
    objective = objective_for(model)
    item = ITEMS[0]
    spread = {}
    for passes in (4, 64):
        scores = [suffix_scores(model, objective, [item], passes=passes, seed=seed)[0] for seed in range(40)]
        values = torch.tensor([score.nll for score in scores], dtype=torch.float64)
        spread[passes] = float(values.std())
        reported = float(torch.tensor([score.stderr for score in scores]).pow(2).mean().sqrt())
        assert 0.5 < reported / spread[passes] < 2, (passes, reported, spread[passes])
    assert spread[4] / spread[64] > 2.5, spread


def test_autoregressive_scores_are_exact_and_greedy_is_the_argmax():
    model = tiny_ar()
    objective = objective_for(model)
    scores = suffix_scores(model, objective, ITEMS, passes=8)
    for (ids, first), score in zip(ITEMS, scores):
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]))[0]
        expected = hand_nll(logits, torch.tensor(ids[1:]), model.config.mask_token_id)[first - 1:].sum()
        assert score.nll == pytest.approx(float(expected), rel=1e-5) and score.stderr == 0
    # A continuation of the model's own argmaxes is greedy; changing its last token makes it not.
    ids = [0, 5, 6]
    for _ in range(3):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        logits[model.config.mask_token_id] = float("-inf")
        ids.append(int(logits.argmax()))
    wrong = ids[:-1] + [(ids[-1] + 1) % 40]
    assert greedy_suffixes(model, objective, [(ids, 3), (wrong, 3)]) == [True, False]


@pytest.mark.parametrize("kind", ["pgm", "mdlm"])
def test_greedy_is_the_continuation_predicted_at_once_from_the_context(kind):
    model = MODELS[kind]()
    objective = objective_for(model)
    context = [0, 5, 6, 7]
    with torch.no_grad():
        if kind == "pgm":
            logits = model.predict(torch.tensor([context]), torch.arange(4)[None], torch.tensor([[4, 5, 6]]))[0]
        else:
            noisy = torch.tensor([context + [model.config.mask_token_id] * (model.config.length - 4)])
            logits = model(noisy)[0, 4:7]
    logits[:, model.config.mask_token_id] = float("-inf")
    best = logits.argmax(-1).tolist()
    second = logits.topk(2, dim=-1).indices[:, 1].tolist()
    items = [(context + best, 4), (context + best[:2] + second[2:], 4), (context + second[:1] + best[1:], 4)]
    assert greedy_suffixes(model, objective, items) == [True, False, False]


def test_items_must_score_something():
    model = tiny_pgm()
    with pytest.raises(ValueError, match="at least one id must be scored"):
        suffix_scores(model, objective_for(model), [([0, 5, 6], 3)])


def test_an_mdlm_refuses_padding_lengths_outside_its_rows():
    with pytest.raises(ValueError, match="lengths must be"):
        tiny_mdlm()(torch.zeros(2, 6, dtype=torch.long), lengths=torch.tensor([3, 7]))
