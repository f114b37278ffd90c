import math

import pytest
import torch
from conftest import redraw_zero_initialised

from pgm.models import CausalConfig, CausalTransformer
from pgm.objectives import AutoregressiveObjective
from pgm.sampling import SamplingOptions, sample_autoregressive


def tiny_ar(fresh=False):
    torch.manual_seed(0)
    model = CausalTransformer(CausalConfig(vocab_size=41, length=20, hidden_size=32, num_heads=4, blocks=2,
                                           cond_dim=16, dropout=0.0))
    return (model if fresh else redraw_zero_initialised(model)).eval()


def test_position_i_sees_only_tokens_up_to_i():
    model = tiny_ar()
    tokens = torch.randint(0, 40, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 40
    a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_cached_forward_equals_the_full_forward():
    model = tiny_ar()
    tokens = torch.randint(0, 40, (3, 20))
    full = model(tokens)
    cache = model.new_cache(20)
    pieces = [model(tokens[:, :7], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache) for i in range(7, 20)]
    assert float(((torch.cat(pieces, 1) - full).abs().max() / full.abs().max()).detach()) < 1e-5


def test_kv_cache_sampling_gives_the_same_tokens_as_recomputing_everything():
    model = tiny_ar()
    known = torch.randint(0, 40, (3, 20))
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, :1], mask[1, :5], mask[2, :9] = True, True, True  # prompts of different lengths
    stats = {}
    cached = sample_autoregressive(model, known_tokens=known, known_mask=mask, generator=torch.Generator().manual_seed(4),
                                   stats=stats)
    plain = sample_autoregressive(model, known_tokens=known, known_mask=mask, use_cache=False,
                                  generator=torch.Generator().manual_seed(4))
    assert torch.equal(cached, plain) and torch.equal(cached[mask], known[mask])
    assert stats["forward_calls"] == 19 and int(cached.max()) < 40  # one prefill + one call per later position


def test_only_prefixes_can_be_continued():
    known, mask = torch.zeros(1, 20, dtype=torch.long), torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 3] = True
    with pytest.raises(ValueError, match="prefix"):
        sample_autoregressive(tiny_ar(), known_tokens=known, known_mask=mask)


def test_uniform_model_has_perplexity_v_minus_one():
    model = tiny_ar(fresh=True)
    out = AutoregressiveObjective().elbo(model, torch.randint(0, 40, (4, 20)))
    assert math.isclose(float(out.nll_sum / out.tokens), math.log(40), rel_tol=1e-6)
    assert int(out.tokens) == 4 * 19


def test_greedy_sampling_follows_the_argmax():
    model = tiny_ar()
    known, mask = torch.zeros(1, 20, dtype=torch.long), torch.zeros(1, 20, dtype=torch.bool)
    mask[0, 0] = True
    out = sample_autoregressive(model, known_tokens=known, known_mask=mask, options=SamplingOptions(temperature=0))
    logits = model(out)[0, :-1, :40]
    assert torch.equal(logits.argmax(-1), out[0, 1:])
