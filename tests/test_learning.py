"""Tiny models trained for a few hundred steps must learn a small repetitive text."""

import math

import pytest
import torch

from pgm.models import MaskedDiffusionConfig, MaskedDiffusionTransformer, PartitionConfig, PartitionTransformer
from pgm.objectives import MaskedDiffusionObjective, PartitionObjective
from pgm.sampling import SamplingOptions, sample_pgm

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
ALPHABET = sorted(set(TEXT))
VOCAB = len(ALPHABET) + 1  # + the mask id
IDS = torch.tensor([ALPHABET.index(c) for c in TEXT])
LENGTH = 32


def windows(generator, batch=16):
    starts = torch.randint(0, len(IDS) - LENGTH, (batch,), generator=generator)
    return torch.stack([IDS[s:s + LENGTH] for s in starts.tolist()])


def train(model, objective, steps=200):
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = objective.loss(model, windows(generator), generator=generator).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        outs = [objective.elbo(model, windows(generator, 64), generator=generator) for _ in range(4)]
    return float(sum(o.nll_sum for o in outs) / sum(o.tokens for o in outs))


@pytest.mark.parametrize("kind", ["pgm", "mdlm"])
def test_tiny_model_learns_repetitive_text_far_below_uniform(kind):
    torch.manual_seed(0)
    if kind == "pgm":
        model = PartitionTransformer(PartitionConfig(vocab_size=VOCAB, length=LENGTH, hidden_size=64, num_heads=4,
                                                     encoder_blocks=2, decoder_blocks=2, cond_dim=32, dropout=0.0))
        objective = PartitionObjective()
    else:
        model = MaskedDiffusionTransformer(MaskedDiffusionConfig(vocab_size=VOCAB, length=LENGTH, hidden_size=64,
                                                                 num_heads=4, blocks=4, cond_dim=32, dropout=0.0))
        objective = MaskedDiffusionObjective()
    uniform = math.log(VOCAB - 1)
    elbo = train(model, objective)
    assert elbo < 0.25 * uniform, (elbo, uniform)
    if kind == "pgm":
        sample = sample_pgm(model, num_samples=16, length=LENGTH, steps=LENGTH, options=SamplingOptions(temperature=0.5),
                            generator=torch.Generator().manual_seed(0))
        assert bigram_share(sample) > 0.6
        assert bigram_share(torch.randint(0, VOCAB - 1, (16, LENGTH))) < 0.2


def bigram_share(sample: torch.Tensor) -> float:
    """Share of adjacent character pairs in `sample` that occur somewhere in the training text."""
    seen = {TEXT[i:i + 2] for i in range(len(TEXT) - 1)}
    rows = ["".join(ALPHABET[i] for i in row) for row in sample.tolist()]
    pairs = [row[i:i + 2] for row in rows for i in range(len(row) - 1)]
    return sum(pair in seen for pair in pairs) / len(pairs)
