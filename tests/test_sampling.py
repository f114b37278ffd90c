import pytest
import torch
from conftest import tiny_mdlm, tiny_pgm

from pgm.sampling import SamplingOptions, filter_top_p, sample_categorical, sample_mdlm, sample_pgm, sample_scored


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("counts", ["uniform", "binomial"])
@pytest.mark.parametrize("steps", [1, 3, 7, 20, 33])
def test_efficient_and_reference_pgm_samplers_give_the_same_tokens(counts, steps):
    model = tiny_pgm()
    efficient = sample_pgm(model, num_samples=4, length=20, steps=steps, counts=counts, generator=seeded(5))
    reference = sample_pgm(model, num_samples=4, length=20, steps=steps, counts=counts, generator=seeded(5),
                           view="reference")
    assert torch.equal(efficient, reference)
    assert efficient.shape == (4, 20) and int(efficient.max()) < 40  # the mask id 40 is never drawn


@pytest.mark.parametrize("mode", ["learn+freqs", "learn+freqs+mean", "learn+freqs+logsumexp"])
def test_known_tokens_of_different_amounts_per_row_stay_and_both_views_agree(mode):
    model = tiny_pgm(pre_query_mode=mode)
    known = torch.randint(0, 40, (3, 20), generator=seeded(1))
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, :6] = True          # a prompt
    mask[1, 12:] = True         # a fixed suffix
    mask[2, [0, 4, 17]] = True  # scattered known tokens around gaps
    for counts in ("uniform", "binomial"):
        outs = [sample_pgm(model, known_tokens=known, known_mask=mask, steps=5, counts=counts, generator=seeded(2),
                           view=view) for view in ("efficient", "reference")]
        assert torch.equal(outs[0], outs[1])
        assert torch.equal(outs[0][mask], known[mask])


def test_same_seed_same_samples_and_different_seed_different_samples():
    model = tiny_pgm()
    a = sample_pgm(model, num_samples=3, length=20, steps=4, generator=seeded(1))
    b = sample_pgm(model, num_samples=3, length=20, steps=4, generator=seeded(1))
    c = sample_pgm(model, num_samples=3, length=20, steps=4, generator=seeded(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pgm_one_step_samples_every_position_from_the_empty_clean_set():
    model = tiny_pgm()
    tokens = sample_pgm(model, num_samples=2, length=20, steps=1, options=SamplingOptions(temperature=0))
    empty = torch.zeros(1, 0, dtype=torch.long)
    expected = model.predict(empty, empty, torch.arange(20)[None]).argmax(-1)[0]
    expected_without_mask = model.predict(empty, empty, torch.arange(20)[None])[0, :, :40].argmax(-1)
    assert torch.equal(tokens[0], expected_without_mask) and torch.equal(tokens[1], expected_without_mask)
    assert expected.shape == expected_without_mask.shape


def test_mdlm_cache_skips_forward_passes_without_changing_samples():
    model = tiny_mdlm()
    stats_cached, stats_plain = {}, {}
    cached = sample_mdlm(model, num_samples=2, length=20, steps=60, generator=seeded(3), stats=stats_cached)
    plain = sample_mdlm(model, num_samples=2, length=20, steps=60, generator=seeded(3), cache=False,
                        stats=stats_plain)
    assert torch.equal(cached, plain)
    assert stats_plain["forward_calls"] == 60
    assert stats_cached["forward_calls"] < 40
    assert int(cached.max()) < 40


def test_mdlm_keeps_known_tokens():
    model = tiny_mdlm()
    known = torch.randint(0, 40, (2, 20))
    mask = torch.rand(2, 20) < 0.4
    out = sample_mdlm(model, known_tokens=known, known_mask=mask, steps=8, generator=seeded(0))
    assert torch.equal(out[mask], known[mask]) and int(out.max()) < 40


def test_sample_categorical_matches_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(200000, -1)
    draws = sample_categorical(logits, generator=seeded(0))
    frequencies = torch.bincount(draws, minlength=4) / 200000
    assert torch.allclose(frequencies, probs, atol=0.005)


def test_top_p_is_applied_after_the_mask_logit_is_removed():
    # Without the suppressed id the distribution is [0.5, 0.3, 0.2]; the nucleus 0.75 keeps ids 0 and 1.
    logits = torch.tensor([0.5, 0.3, 0.2, 10.0]).log()
    logits[3] = 10.0
    draws = sample_categorical(logits.expand(20000, -1), SamplingOptions(top_p=0.75), suppress=(3,),
                               generator=seeded(0))
    frequencies = torch.bincount(draws, minlength=4) / 20000
    assert torch.allclose(frequencies, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01)


def test_top_k_keeps_the_k_most_likely_after_the_mask_logit_is_removed():
    # Without the suppressed id the distribution is [0.5, 0.3, 0.2]; the top 2 are ids 0 and 1.
    logits = torch.tensor([0.5, 0.3, 0.2, 1.0]).log()
    logits[3] = 10.0
    draws = sample_categorical(logits.expand(20000, -1), SamplingOptions(top_k=2), suppress=(3,), generator=seeded(0))
    frequencies = torch.bincount(draws, minlength=4) / 20000
    assert torch.allclose(frequencies, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01)
    one = sample_categorical(logits.expand(50, -1), SamplingOptions(top_k=1), suppress=(3,), generator=seeded(0))
    assert (one == 0).all()  # top_k=1 is greedy


def test_top_k_reaches_every_front_end_from_the_settings(text_run, pgm_main):
    import pgm

    pipe = pgm.load(text_run)
    greedy = pipe.sample(num_samples=2, steps=5, temperature=0).tokens
    assert torch.equal(pipe.sample(num_samples=2, steps=5, top_k=1, seed=4).tokens, greedy)
    code, out, err = pgm_main("sample", text_run, "--num-samples", "2", "--steps", "5", "--top-k", "1")
    assert code == 0 and out == pgm_main("sample", text_run, "--num-samples", "2", "--steps", "5",
                                         "--temperature", "0")[1]
    with pytest.raises(ValueError, match="top_k must be a non-negative integer"):
        pipe.generate(top_k=-3)


def test_filter_top_p_keeps_at_least_the_best_token():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    kept = torch.isfinite(filter_top_p(logits, 0.01))
    assert kept.tolist() == [[True, False, False], [False, False, True]]


def test_temperature_zero_is_greedy_and_low_temperature_sharpens():
    logits = torch.tensor([1.0, 2.0, 0.5]).expand(5000, -1)
    assert (sample_categorical(logits, SamplingOptions(temperature=0)) == 1).all()
    cold = sample_categorical(logits, SamplingOptions(temperature=0.2), generator=seeded(0))
    warm = sample_categorical(logits, SamplingOptions(temperature=1.0), generator=seeded(0))
    assert (cold == 1).float().mean() > (warm == 1).float().mean() + 0.2


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_samples=2, length=21, steps=4), "model of length 20"),
    (dict(num_samples=2, length=10, steps=0), "steps must be a positive integer"),
    (dict(steps=4), "give num_samples"),
    (dict(known_tokens=torch.full((1, 5), 40), known_mask=torch.ones(1, 5, dtype=torch.bool), steps=2), "mask id"),
    (dict(known_tokens=torch.full((1, 5), 41), known_mask=torch.ones(1, 5, dtype=torch.bool), steps=2), "outside"),
    (dict(known_tokens=torch.zeros(1, 5, dtype=torch.long), steps=2), "together"),
])
def test_bad_sampler_inputs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_pgm(tiny_pgm(), **kwargs)
    with pytest.raises(ValueError, match=message):
        sample_mdlm(tiny_mdlm(), **kwargs)


def test_sampling_options_are_validated():
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingOptions(temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        SamplingOptions(top_k=1.5)


def test_mdlm_logits_only_where_revealed_draw_the_same_tokens_as_logits_everywhere():
    model = tiny_mdlm()
    fair = sample_mdlm(model, num_samples=3, length=20, steps=7, generator=seeded(9))
    everywhere = sample_mdlm(model, num_samples=3, length=20, steps=7, generator=seeded(9), logits_everywhere=True)
    assert torch.equal(fair, everywhere)


@pytest.mark.parametrize("order", ["random", "left-to-right", "confidence", "margin", "entropy"])
@pytest.mark.parametrize("counts", ["uniform", "binomial"])
def test_every_order_agrees_between_the_efficient_and_reference_views(order, counts):
    model = tiny_pgm()
    known = torch.randint(0, 40, (3, 20), generator=seeded(1))
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, :3], mask[1, 15:], mask[2, [2, 9]] = True, True, True
    outs = [sample_pgm(model, known_tokens=known, known_mask=mask, steps=6, counts=counts, order=order, view=view,
                       generator=seeded(3)) for view in ("efficient", "reference")]
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][mask], known[mask]) and int(outs[0].max()) < 40


class QuerySpy:
    """Wraps a PGM and records the query positions of every `predict` call."""

    def __init__(self, model):
        self.model, self.config, self.queries = model, model.config, []

    def parameters(self):
        return self.model.parameters()

    def condition(self, *args):
        return self.model.condition(*args)

    def predict(self, *args, **kwargs):
        self.queries.append(args[2].clone())
        return self.model.predict(*args, **kwargs)


def test_left_to_right_decodes_consecutive_blocks():
    spy = QuerySpy(tiny_pgm())
    sample_pgm(spy, num_samples=2, length=20, steps=5, order="left-to-right")
    assert [q[0].tolist() for q in spy.queries] == [list(range(i, i + 4)) for i in range(0, 20, 4)]


@pytest.mark.parametrize("order", ["confidence", "margin", "entropy"])
def test_scored_orders_commit_the_most_certain_positions(order):
    model = tiny_pgm()
    spy = QuerySpy(model)
    greedy = SamplingOptions(temperature=0)
    out = sample_pgm(spy, num_samples=2, length=20, steps=4, order=order, options=greedy)
    candidates = [set(q[0].tolist()) for q in spy.queries]
    assert candidates[0] == set(range(20)) and len(candidates) == 4
    committed = [a - b for a, b in zip(candidates, candidates[1:] + [set()])]
    assert all(len(c) == 5 for c in committed)
    known: set = set()
    for step_candidates, chosen in zip(candidates, committed):
        # Replay the step on row 0: every unknown position is queried; the 5 kept are the most
        # certain ones (up to float ties) and hold the greedy draws.
        assert step_candidates == set(range(20)) - known
        clean = torch.tensor(sorted(known), dtype=torch.long)[None]
        queried = torch.tensor(sorted(step_candidates))[None]
        logits = model.predict(out[:1, clean[0]], clean, queried)
        tokens, certainty = sample_scored(logits, order, greedy, suppress=(40,))
        by_position = dict(zip(queried[0].tolist(), certainty[0].tolist()))
        kept = min(by_position[p] for p in chosen)
        others = [by_position[p] for p in step_candidates - chosen]
        assert not others or kept >= max(others) - 1e-6
        drawn = dict(zip(queried[0].tolist(), tokens[0].tolist()))
        assert all(out[0, p] == drawn[p] for p in chosen)
        known |= chosen
