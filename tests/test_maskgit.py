"""The Halton-MaskGIT baseline transformer against the released layout and an independent
transcription of its forward pass (image-stack.md §2)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pgm.errors import ConfigError
from pgm.models.maskgit import MaskGITConfig, MaskGITTransformer

TINY = dict(codebook_size=64, grid_size=4, hidden_size=32, depth=2, num_heads=4, mlp_dim=64, num_classes=10,
            registers=1, dropout=0.0)


def expected_released_state_dict() -> list[tuple[str, tuple[int, ...]]]:
    """§2.2, written out from the document: 274 (name, shape) pairs in module order."""
    entries = [("cls_emb.weight", (1001, 1024)), ("tok_emb.weight", (16385, 1024)), ("pos_emb.weight", (1024, 1024))]
    for i in range(24):
        layer = f"transformer.layers.{i}"
        entries += [
            (f"{layer}.mlp.1.weight", (6144, 1024)), (f"{layer}.mlp.1.bias", (6144,)),
            (f"{layer}.ln1.weight", (1024,)),
            (f"{layer}.attn.wq.weight", (1024, 1024)), (f"{layer}.attn.wk.weight", (1024, 1024)),
            (f"{layer}.attn.wv.weight", (1024, 1024)), (f"{layer}.attn.wo.weight", (1024, 1024)),
            (f"{layer}.ln2.weight", (1024,)),
            (f"{layer}.ff.w1.weight", (2816, 1024)), (f"{layer}.ff.w2.weight", (1024, 2816)),
            (f"{layer}.ff.w3.weight", (2816, 1024)),
        ]
    entries += [
        ("last_norm.norm_final.weight", (1024,)), ("last_norm.norm_final.bias", (1024,)),
        ("last_norm.mlp.1.weight", (2048, 1024)), ("last_norm.mlp.1.bias", (2048,)),
        ("head.weight", (16385, 1024)), ("head.bias", (16385,)),
        ("reg_tokens.weight", (1, 1024)),
    ]
    return entries


def tiny_model(seed: int = 0, **overrides) -> MaskGITTransformer:
    """A tiny model with every parameter redrawn at random: the zeroed adaLN of a fresh model would
    make the blocks identities and the comparisons below trivial."""
    torch.manual_seed(seed)
    model = MaskGITTransformer(MaskGITConfig(**{**TINY, **overrides}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


def tiny_inputs(config: MaskGITConfig, batch: int = 3, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, config.codebook_size, (batch, config.length), generator=generator)
    masked = torch.rand(batch, config.length, generator=generator) < 0.5
    codes[masked] = config.mask_token_id
    labels = torch.randint(0, config.num_classes, (batch,), generator=generator)
    return codes, labels


def reference_logits(weights: dict, config: MaskGITConfig, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """§2.3 step by step with plain tensor ops (eval mode: no dropout)."""
    hidden, heads = config.hidden_size, config.num_heads
    head_dim = hidden // heads
    batch, length = codes.shape

    def rms(x):
        x32 = x.float()
        return (x32 / torch.sqrt((x32 * x32).mean(dim=-1, keepdim=True) + 1e-5)).to(x.dtype)

    def linear(x, name, bias=True):
        y = x @ weights[f"{name}.weight"].t()
        return y + weights[f"{name}.bias"] if bias else y

    c = weights["cls_emb.weight"][labels]                                          # 1. [B, H]
    h = weights["tok_emb.weight"][codes] + weights["pos_emb.weight"][:length][None]  # 2. [B, N, H]
    if config.registers:                                                            # 3. append, no position
        h = torch.cat([h, weights["reg_tokens.weight"][None].repeat(batch, 1, 1)], dim=1)
    for i in range(config.depth):                                                   # 4.
        p = f"transformer.layers.{i}"
        m = linear(c * torch.sigmoid(c), f"{p}.mlp.1")
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None, j * hidden:(j + 1) * hidden] for j in range(6))

        x = rms(h) * weights[f"{p}.ln1.weight"] * (1 + scale1) + shift1
        q, k, v = (linear(x, f"{p}.attn.{w}", bias=False) for w in ("wq", "wk", "wv"))
        q, k = rms(q), rms(k)  # over all H channels, before the head split
        q, k, v = (t.reshape(batch, -1, heads, head_dim).permute(0, 2, 1, 3) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        attn = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(batch, -1, hidden)
        h = h + gate1 * linear(attn, f"{p}.attn.wo", bias=False)

        x = rms(h) * weights[f"{p}.ln2.weight"] * (1 + scale2) + shift2
        a = linear(x, f"{p}.ff.w1", bias=False)
        product = a * torch.sigmoid(a) * linear(x, f"{p}.ff.w3", bias=False)
        h = h + gate2 * linear(product, f"{p}.ff.w2", bias=False)
    h = h[:, :length]                                                               # 5.
    m = linear(c * torch.sigmoid(c), "last_norm.mlp.1")                             # 6.
    shift, scale = m[:, None, :hidden], m[:, None, hidden:]
    h = (rms(h) * weights["last_norm.norm_final.weight"] + weights["last_norm.norm_final.bias"]) * (1 + scale) + shift
    return h @ weights["tok_emb.weight"].t() + weights["head.bias"]                 # 7.


def test_released_configuration_has_the_released_state_dict():
    config = MaskGITConfig()
    assert (config.vocab_size, config.mask_token_id, config.length, config.null_class, config.ffn_hidden) == \
        (16385, 16384, 1024, 1000, 2816)
    with torch.device("meta"):
        model = MaskGITTransformer(config)
    expected = expected_released_state_dict()
    assert len(expected) == 274
    assert [(name, tuple(t.shape)) for name, t in model.state_dict().items()] == expected
    assert model.head.weight is model.tok_emb.weight
    assert model.num_parameters() == 480_443_393


def test_config_validation_and_round_trip():
    config = MaskGITConfig(**TINY)
    assert config.ffn_hidden == 256  # floor(2 * 64 / 3) = 42, rounded up to 256
    assert MaskGITConfig(mlp_dim=768).ffn_hidden == 512
    assert MaskGITConfig.from_dict(config.to_dict()) == config and config.to_dict()["kind"] == "maskgit"
    for bad in (dict(num_heads=3), dict(hidden_size=36, num_heads=12), dict(registers=-1), dict(depth=0),
                dict(num_classes=0), dict(dropout=1.0)):
        with pytest.raises(ConfigError):
            MaskGITConfig(**{**TINY, **bad})


def test_initialisation():
    torch.manual_seed(0)
    model = MaskGITTransformer(MaskGITConfig(**{**TINY, "hidden_size": 64, "codebook_size": 2000}))
    for name, param in model.named_parameters():
        if name.startswith("transformer.layers.") and ".mlp.1." in name:  # block adaLN: blocks start as identities
            assert not param.any(), name
        elif name.endswith("emb.weight"):
            assert abs(param.std().item() - 0.02) < 0.002 and abs(param.mean().item()) < 0.002, name
    bound = math.sqrt(6 / (64 + 128))  # xavier-uniform of the final adaLN linear [128, 64]
    final = model.last_norm.mlp[1].weight
    assert final.abs().max() <= bound and final.abs().max() > 0.9 * bound
    assert not model.head.bias.any() and not model.last_norm.mlp[1].bias.any()


def test_forward_equals_step_by_step_transcription():
    model = tiny_model()
    codes, labels = tiny_inputs(model.config)
    labels[0] = model.config.null_class
    with torch.no_grad():
        logits = model(codes, labels)
        expected = reference_logits(model.state_dict(), model.config, codes, labels)
    assert logits.shape == (3, 16, 65)
    assert (logits - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_without_registers():
    model = tiny_model(registers=0)
    assert not any(name.startswith("reg_tokens") for name in model.state_dict())
    codes, labels = tiny_inputs(model.config)
    with torch.no_grad():
        logits = model(codes, labels)
        expected = reference_logits(model.state_dict(), model.config, codes, labels)
    assert (logits - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_registers_take_part_in_attention():
    model = tiny_model()
    codes, labels = tiny_inputs(model.config)
    with torch.no_grad():
        before = model(codes, labels)
        model.reg_tokens.weight.add_(1.0)
        assert not torch.allclose(model(codes, labels), before)


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.1)
    codes, labels = tiny_inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model(codes, labels), model(codes, labels))
        model.train()
        assert not torch.allclose(model(codes, labels), model(codes, labels))


def test_strict_load_keeps_the_tie_and_the_logits():
    source = tiny_model(seed=0)
    state = source.state_dict()
    assert "head.weight" in state and "tok_emb.weight" in state
    codes, labels = tiny_inputs(source.config)
    with torch.no_grad():
        expected = source(codes, labels)
    for assign in (False, True):
        # Cloned tensors, as a checkpoint read back from disk without shared storage would be.
        target = tiny_model(seed=1)
        target.load_state_dict({name: t.clone() for name, t in state.items()}, strict=True, assign=assign)
        assert target.head.weight is target.tok_emb.weight
        with torch.no_grad():
            assert torch.equal(target(codes, labels), expected)
    without_head = {name: t for name, t in state.items() if name != "head.weight"}
    target = tiny_model(seed=1)
    target.load_state_dict(without_head, strict=True)
    assert target.head.weight is target.tok_emb.weight and torch.equal(target.head.weight, source.tok_emb.weight)
    with pytest.raises(ValueError, match="ties"):
        target.load_state_dict({**state, "head.weight": state["head.weight"] + 1})


def test_null_class_is_accepted_and_conditions_the_output():
    model = tiny_model()
    codes, _ = tiny_inputs(model.config, batch=1)
    with torch.no_grad():
        real = model(codes, torch.tensor([3]))
        null = model(codes, torch.tensor([model.config.null_class]))
    assert not torch.allclose(real, null)


@pytest.mark.parametrize("codes,labels,message", [
    (torch.zeros(2, 16), torch.zeros(2, dtype=torch.long), "codes must be an integer tensor"),
    (torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long),
     r"codes must have shape \[batch, length\]"),
    (torch.zeros(2, 15, dtype=torch.long), torch.zeros(2, dtype=torch.long), "codes must hold 16 positions"),
    (torch.full((2, 16), 65), torch.zeros(2, dtype=torch.long), r"code 65, outside \[0, 65\)"),
    (torch.full((2, 16), -1), torch.zeros(2, dtype=torch.long), "code -1"),
    (torch.zeros(2, 16, dtype=torch.long), torch.zeros(2), "labels must be an integer tensor"),
    (torch.zeros(2, 16, dtype=torch.long), torch.zeros(3, dtype=torch.long), r"labels must have shape \[batch\]"),
    (torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), r"labels must have shape \[batch\]"),
    (torch.zeros(2, 16, dtype=torch.long), torch.tensor([0, 11]), r"class label 11, outside \[0, 11\)"),
])
def test_bad_inputs_raise(codes, labels, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(codes, labels)


@pytest.fixture
def one_thread():
    # Tiny matmuls: a second thread only adds contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fresh_model_learns_a_masked_token_problem(one_thread):
    """Each image is a class-dependent pattern; half of its codes are masked and predicted."""
    torch.manual_seed(0)
    config = MaskGITConfig(**TINY)
    model = MaskGITTransformer(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(config.length)

    def loss_on_batch():
        labels = torch.randint(0, config.num_classes, (16,), generator=generator)
        targets = (labels[:, None] * 7 + positions) % config.codebook_size  # [B, N]
        masked = torch.rand(targets.shape, generator=generator) < 0.5
        codes = targets.masked_fill(masked, config.mask_token_id)
        logits = model(codes, labels)
        return F.cross_entropy(logits[masked], targets[masked])

    losses = []
    for _ in range(100):
        loss = loss_on_batch()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.9 * math.log(config.vocab_size)
    # Below log(num_classes) = 2.3, the position-only optimum: the class conditioning is learned too.
    assert sum(losses[-5:]) / 5 < 0.2 * losses[0] < math.log(config.num_classes)
