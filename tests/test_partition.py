import json

import pytest
import torch
import torch.nn.functional as F
from conftest import redraw_zero_initialised, tiny_pgm

from pgm.errors import ConfigError
from pgm.models import PartitionConfig, PartitionTransformer, config_from_dict
from pgm.models.layers import (FinalLayer, GroupMask, GroupSegments, LayerNorm, Rotary, apply_rotary, gelu_tanh,
                               grouped_attention, jagged_attention, training_attention)

MODES = ["learn", "learn+freqs", "learn+freqs+mean", "learn+freqs+logsumexp"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max()).detach())


def inference_inputs(tokens: torch.Tensor, groups: torch.Tensor):
    """Group 0 packed as a right-padded clean set, group 1 as right-padded queries."""
    batch = tokens.shape[0]
    clean = [(~groups[b]).nonzero().flatten() for b in range(batch)]
    queries = [groups[b].nonzero().flatten() for b in range(batch)]
    width_c, width_q = max(map(len, clean)), max(map(len, queries))
    clean_tokens = torch.zeros(batch, width_c, dtype=torch.long)
    clean_positions = torch.zeros(batch, width_c, dtype=torch.long)
    query_positions = torch.zeros(batch, width_q, dtype=torch.long)
    for b in range(batch):
        clean_tokens[b, :len(clean[b])] = tokens[b, clean[b]]
        clean_positions[b, :len(clean[b])] = clean[b]
        query_positions[b, :len(queries[b])] = queries[b]
    lengths = torch.tensor([len(c) for c in clean])
    return clean_tokens, clean_positions, query_positions, lengths, queries


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("processor,norm", [("linear", "layernorm"), ("mlp4", "rmsnorm")])
def test_predict_equals_training_view_at_the_other_group(mode, processor, norm):
    model = tiny_pgm(pre_query_mode=mode, query_processor=processor, query_norm=norm)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 40, (4, 20), generator=generator)
    groups = torch.rand(4, 20, generator=generator) < torch.tensor([0.2, 0.5, 0.7, 0.5])[:, None]
    with torch.no_grad():
        full = model(tokens, groups)
        clean_tokens, clean_positions, query_positions, lengths, queries = inference_inputs(tokens, groups)
        assert len(set(lengths.tolist())) > 1, "the test needs clean sets of different sizes"
        batched = model.predict(clean_tokens, clean_positions, query_positions, lengths, check_inputs=False)
    worst = 0.0
    for b, positions in enumerate(queries):
        worst = max(worst, relative_error(batched[b, :len(positions)], full[b, positions]))
        single = model.predict(clean_tokens[b:b + 1, :lengths[b]], clean_positions[b:b + 1, :lengths[b]],
                               positions[None])
        worst = max(worst, relative_error(single[0], full[b, positions]))
    assert worst < 1e-5


def test_predict_with_equal_lengths_needs_no_lengths():
    model = tiny_pgm()
    tokens = torch.randint(0, 40, (3, 20))
    order = torch.rand(3, 20).argsort(1)
    clean_positions, query_positions = order[:, :12], order[:, 12:]
    groups = torch.ones(3, 20, dtype=torch.bool).scatter(1, clean_positions, False)
    with torch.no_grad():
        full = model(tokens, groups)
        fast = model.predict(tokens.gather(1, clean_positions), clean_positions, query_positions)
    expected = full.gather(1, query_positions[..., None].expand(-1, -1, full.shape[-1]))
    assert relative_error(fast, expected) < 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group", [0, 1])
def test_an_empty_group_gives_finite_values_and_gradients(mode, group):
    model = tiny_pgm(pre_query_mode=mode).train()
    tokens = torch.randint(0, 40, (2, 20))
    groups = torch.full((2, 20), group)
    logits = model(tokens, groups)
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


def test_predict_with_an_empty_clean_set_is_finite():
    model = tiny_pgm(pre_query_mode="learn+freqs+logsumexp")
    empty = torch.zeros(2, 0, dtype=torch.long)
    logits = model.predict(empty, empty, torch.tensor([[0, 5], [3, 19]]))
    assert logits.shape == (2, 2, 41) and torch.isfinite(logits).all()
    padded = model.predict(torch.tensor([[4, 0], [7, 0]]), torch.tensor([[1, 0], [2, 0]]),
                           torch.tensor([[0, 5], [3, 19]]), lengths=torch.tensor([0, 1]))
    assert torch.isfinite(padded).all()
    assert torch.allclose(padded[0], logits[0], atol=1e-6)


def test_state_dict_follows_the_released_layout():
    model = tiny_pgm(encoder_blocks=1, decoder_blocks=1)
    keys = list(model.state_dict())
    assert keys[:2] == ["vocab_embed.embedding", "rotary_emb.inv_freq"]
    assert "decoder.group_swap.pos_freqs" not in keys  # recomputed, never saved
    expected = {
        "sigma_map.mlp.0.weight", "sigma_map.mlp.2.bias",
        "encoder.blocks.0.norm1.weight", "encoder.blocks.0.attn_qkv.weight", "encoder.blocks.0.attn_out.weight",
        "encoder.blocks.0.norm2.weight", "encoder.blocks.0.mlp.0.weight", "encoder.blocks.0.mlp.2.bias",
        "encoder.blocks.0.adaLN_modulation.weight", "decoder.group_swap.base_embedding",
        "decoder.group_swap.pre_query_norm.weight", "decoder.group_swap.pre_query_norm.bias",
        "decoder.group_swap.query_processor.weight", "decoder.group_swap.hidden_to_key_value.weight",
        "decoder.group_swap.output_linear.bias", "decoder.layers.0.q_norm1.weight", "decoder.layers.0.kv_norm1.weight",
        "decoder.layers.0.attn_q.weight", "decoder.layers.0.attn_kv.weight", "decoder.layers.0.attn_out.weight",
        "decoder.layers.0.norm2.weight", "decoder.layers.0.adaLN_modulation.bias", "output_layer.norm_final.weight",
        "output_layer.linear.weight", "output_layer.linear.bias", "output_layer.adaLN_modulation.weight",
    }
    assert expected <= set(keys)
    names = [name for name, _ in model.named_parameters()]
    assert names.index("decoder.group_swap.base_embedding") < names.index("decoder.group_swap.pre_query_norm.weight")
    assert model.state_dict()["encoder.blocks.0.attn_qkv.weight"].shape == (96, 32)
    assert model.state_dict()["output_layer.adaLN_modulation.weight"].shape == (64, 16)


def test_fresh_model_has_zero_output_layer_and_modulations():
    model = PartitionTransformer(PartitionConfig(vocab_size=11, length=8, hidden_size=16, num_heads=2,
                                                 encoder_blocks=1, decoder_blocks=1, cond_dim=8))
    logits = model(torch.randint(0, 10, (2, 8)), torch.rand(2, 8) < 0.5)
    assert torch.equal(logits, torch.zeros_like(logits))


def test_time_conditioning_changes_the_output_only_when_enabled():
    model = tiny_pgm(time_conditioning=True)
    tokens, groups = torch.randint(0, 40, (2, 20)), torch.rand(2, 20) < 0.5
    a = model(tokens, groups, torch.tensor([0.1, 0.1]))
    b = model(tokens, groups, torch.tensor([2.0, 2.0]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="time-conditioned"):
        model(tokens, groups)
    with pytest.raises(ValueError, match="not time-conditioned"):
        tiny_pgm()(tokens, groups, torch.tensor([0.1, 0.1]))


def test_config_round_trips_through_json():
    config = PartitionConfig(vocab_size=100, length=64, hidden_size=48, num_heads=6, encoder_blocks=3,
                             decoder_blocks=2, pre_query_mode="learn+freqs+mean", query_processor="mlp4")
    restored = config_from_dict(json.loads(config.to_json()))
    assert restored == config and restored.mask_token_id == 99


@pytest.mark.parametrize("changes,message", [
    (dict(hidden_size=30, num_heads=4), "not divisible"),
    (dict(hidden_size=12, num_heads=4), "must be even"),
    (dict(pre_query_mode="learn+mean"), "pre_query_mode must be one of"),
    (dict(query_processor="mlp"), "query_processor must be one of"),
    (dict(dropout=1.5), "dropout"),
    (dict(mask_token_id=500), "outside the vocabulary"),
    (dict(encoder_blocks="4"), "must be an integer"),
    (dict(time_conditioning=1), "true or false"),
])
def test_impossible_configs_are_refused_with_a_sentence(changes, message):
    values = dict(vocab_size=50, length=16, hidden_size=32, num_heads=4)
    values.update(changes)
    with pytest.raises(ConfigError, match=message):
        PartitionConfig(**values)
    with pytest.raises(ConfigError, match="unknown PartitionConfig field"):
        PartitionConfig.from_dict({"vocab_size": 50, "hidden": 3})


@pytest.mark.parametrize("call,message", [
    (lambda m: m.predict(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), torch.tensor([[1]])), "position 1 appears"),
    (lambda m: m.predict(torch.tensor([[1, 2]]), torch.tensor([[0, 0]]), torch.tensor([[3]])), "position 0 appears"),
    (lambda m: m.predict(torch.tensor([[1, 2]]), torch.tensor([[0, 25]]), torch.tensor([[3]])), "position 25"),
    (lambda m: m.predict(torch.tensor([[1, 99]]), torch.tensor([[0, 1]]), torch.tensor([[3]])), "token id 99"),
    (lambda m: m.predict(torch.tensor([[1, 2]]), torch.tensor([[0, 1, 2]]), torch.tensor([[3]])), "clean_positions has shape"),
    (lambda m: m.predict(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), torch.tensor([[3], [4]])), "batch size"),
    (lambda m: m.predict(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), torch.tensor([[3]]), torch.tensor([3])), "lengths"),
    (lambda m: m.predict(torch.tensor([[1.0, 2.0]]), torch.tensor([[0, 1]]), torch.tensor([[3]])), "integer tensor"),
    (lambda m: m(torch.tensor([[1, -2]]), torch.tensor([[0, 1]])), "token id -2"),
    (lambda m: m(torch.tensor([[1, 2]]), torch.tensor([[0, 2]])), "only 0 and 1"),
    (lambda m: m(torch.tensor([[1, 2]]), torch.tensor([[0, 1, 1]])), "groups has shape"),
    (lambda m: m(torch.zeros(1, 21, dtype=torch.long), torch.zeros(1, 21)), "longer than the model's length"),
])
def test_bad_inputs_raise_one_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_pgm())


def test_padded_clean_slots_may_repeat_positions():
    model = tiny_pgm()
    logits = model.predict(torch.tensor([[1, 2, 0]]), torch.tensor([[0, 1, 1]]), torch.tensor([[3]]),
                           lengths=torch.tensor([2]))
    assert torch.isfinite(logits).all()


def test_inference_shortcuts_in_the_layers_match_the_textbook_formulas():
    generator = torch.Generator().manual_seed(0)
    x = 4 * torch.randn(3, 2, 7, 16, generator=generator)
    with torch.no_grad():  # gelu_tanh takes its in-place sigmoid form only without autograd
        assert (gelu_tanh(x) - F.gelu(x, approximate="tanh")).abs().max() < 1e-5
    needs_grad = x.clone().requires_grad_(True)
    assert torch.equal(gelu_tanh(needs_grad), F.gelu(needs_grad, approximate="tanh"))

    positions = torch.tensor([0, 1, 2, 5, 9, 17, 40])
    rotary = Rotary(16)
    angles = positions[:, None].float() * rotary.inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rotate_half = torch.cat([-x[..., 8:], x[..., :8]], dim=-1)
    assert (apply_rotary(x, rotary(positions)) - (x * cos + rotate_half * sin)).abs().max() < 1e-5

    norm = LayerNorm(16)
    norm.weight.data = torch.rand(16, generator=generator) + 0.5
    centred = x - x.mean(-1, keepdim=True)
    expected = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert (norm(x) - expected).abs().max() < 1e-4

    final = FinalLayer(16, 40000, 8)  # a large vocabulary: a few rows take the weight @ x^T product
    for parameter in final.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator)
    cond = torch.randn(3, 8, generator=generator)
    with torch.no_grad():
        shortcut = final(x[:, 0], cond)
    assert shortcut.is_contiguous() and shortcut.shape == (3, 7, 40000)
    assert torch.allclose(shortcut, final(x[:, 0], cond), rtol=1e-5, atol=1e-4)  # with autograd: nn.Linear


def _groups_with_empty_rows(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    groups = torch.rand(batch, length, generator=generator) < torch.rand(batch, 1, generator=generator)
    groups[0], groups[1] = True, False  # rows whose other group is empty
    return groups


@pytest.mark.parametrize("grouped_attention", [grouped_attention, jagged_attention], ids=["grouped", "jagged"])
@pytest.mark.parametrize("same", [True, False])
def test_grouped_attention_equals_the_dense_mask_in_values_and_gradients(same, grouped_attention):
    generator = torch.Generator().manual_seed(0)
    groups = _groups_with_empty_rows(5, 20, generator)
    offset = 2  # the decoder's queries start after the registers
    mask = GroupMask(groups[:, offset:] if not same else groups, groups, same)
    q = torch.randn(5, 3, mask.query_groups.shape[1], 8, generator=generator, requires_grad=True)
    k, v = (torch.randn(5, 3, 20, 8, generator=generator, requires_grad=True) for _ in range(2))
    weights = torch.randn(5, 3, mask.query_groups.shape[1], 8, generator=generator)
    results = []
    for out in (F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense), grouped_attention(q, k, v, mask)):
        gradients = torch.autograd.grad((out * weights).sum(), (q, k, v))
        results.append((out, gradients))
    (dense, dense_gradients), (grouped, grouped_gradients) = results
    assert (grouped - dense).abs().max() < 1e-5
    assert all((a - b).abs().max() < 1e-5 for a, b in zip(grouped_gradients, dense_gradients))
    if not same:  # no key of the other group: zeros, with zero gradient
        assert grouped[:2].abs().max() == 0 and grouped_gradients[0][:2].abs().max() == 0


@pytest.mark.parametrize("grouped_attention", [grouped_attention, jagged_attention], ids=["grouped", "jagged"])
def test_grouped_attention_reads_only_the_keys_its_mask_allows(grouped_attention):
    # Query 0 (group 0) has one key of group 1 to read (key 2), so it returns that key's value;
    # query 1 (group 1) averages the values of keys 0 and 1 when the keys are identical.
    q = torch.randn(1, 1, 2, 4)
    k = torch.cat([torch.ones(1, 1, 2, 4), torch.randn(1, 1, 1, 4)], dim=2)
    v = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])[None, None]
    mask = GroupMask(torch.tensor([[False, True]]), torch.tensor([[False, False, True]]), same=False)
    out = grouped_attention(q, k, v, mask)
    assert torch.allclose(out[0, 0, 0], v[0, 0, 2]) and torch.allclose(out[0, 0, 1], torch.tensor([0.5, 0.5, 0, 0]))


def test_grouped_segments_by_hand():
    # Row 0: queries F T T, keys all read by group T, so group F reads nothing and its segment is
    # left out; row 1: queries T F F, keys read by F T F.
    layout = GroupSegments.of(torch.tensor([[False, True, True], [True, False, False]]),
                              torch.tensor([[True, True, True], [False, True, False]]))
    assert layout.query_order.tolist() == [1, 2, 4, 5, 3]
    assert layout.query_offsets.tolist() == [0, 2, 4, 5] and layout.query_sizes == (1, 2)
    assert layout.key_order.tolist() == [0, 1, 2, 3, 5, 4]
    assert layout.key_offsets.tolist() == [0, 3, 5, 6] and layout.key_sizes == (1, 3)
    nothing = GroupSegments.of(torch.tensor([[True, True]]), torch.tensor([[False]]))
    assert nothing.query_order.tolist() == [] and nothing.query_offsets.tolist() == [0]
    q = torch.randn(1, 1, 2, 4, requires_grad=True)
    out = jagged_attention(q, torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4),
                           GroupMask(torch.tensor([[True, True]]), torch.tensor([[True]]), same=False))
    assert out.shape == (1, 1, 2, 4) and out.abs().max() == 0  # no query reads a key


@pytest.mark.parametrize("registers", [0, 2])
def test_the_training_view_is_the_same_with_dense_and_grouped_attention(registers):
    torch.manual_seed(0)
    config = PartitionConfig(vocab_size=33, length=16, hidden_size=32, num_heads=2, cond_dim=16, encoder_blocks=2,
                             decoder_blocks=2, registers=registers, time_conditioning=True)
    model = redraw_zero_initialised(PartitionTransformer(config))
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 32, (4, 16), generator=generator)
    groups = _groups_with_empty_rows(4, 16, generator)
    sigma = torch.rand(4, generator=generator)
    results = []
    for kind in ("dense", "grouped", "jagged"):
        model.zero_grad()
        torch.manual_seed(2)  # the same dropout masks
        with training_attention(kind):
            logits = model(tokens, groups, sigma)
        logits.float().logsumexp(-1).sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (dense, dense_gradients), *others = results
    for grouped, grouped_gradients in others:
        assert (grouped - dense).abs().max() < 1e-5
        assert all((grouped_gradients[n] - g).abs().max() <= 1e-5 * g.abs().max().clamp(min=1)
                   for n, g in dense_gradients.items())
    with pytest.raises(ValueError, match="training attention must be one of dense, grouped, jagged"):
        with training_attention("sparse"):
            pass


def test_training_attention_is_dense_unless_asked(monkeypatch):
    import pgm.models.layers as layers

    calls = []
    for name in ("grouped_attention", "jagged_attention"):
        real = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *args, name=name, real=real: calls.append(name) or real(*args))
    model = tiny_pgm()
    tokens, groups = torch.randint(0, 10, (2, model.config.length)), torch.rand(2, model.config.length) < 0.5
    model(tokens, groups)
    assert calls == []
    attentions = model.config.encoder_blocks + model.config.decoder_blocks + 1  # + GroupSwap
    for kind in ("grouped", "jagged"):
        with training_attention(kind):
            model(tokens, groups)
        assert calls == [f"{kind}_attention"] * attentions
        calls.clear()
    model(tokens, groups)
    assert calls == []
