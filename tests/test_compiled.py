"""Compiled sampling: bucketed shapes, one compilation per model, the eager sampler's tokens.

Inductor compiles on the CPU here (it needs a C++ compiler, which CI has); each compilation of a
tiny model takes 10-30 s on two cores, hence the slow marks."""

import pytest
import torch
from conftest import tiny_mdlm, tiny_pgm
from test_images import CLASSES, image_pgm, tiny_maskgit
from torch._dynamo.utils import counters

from pgm.sampling import sample_mdlm, sample_pgm
from pgm.sampling.codes import generate_codes
from pgm.sampling.compiled import bucket
from pgm.sampling.settings import SamplerSettings


def compilations() -> int:
    return counters["stats"]["unique_graphs"]


def test_buckets_are_multiples_of_16_then_four_per_doubling():
    assert [bucket(n) for n in (1, 15, 16, 17, 33, 100, 128)] == [16, 16, 16, 32, 48, 112, 128]
    assert [bucket(n) for n in (129, 160, 161, 255, 257, 500, 1000, 1024, 1025)] == [
        160, 160, 192, 256, 320, 512, 1024, 1024, 1280]
    sizes = range(1, 4097)
    buckets = [bucket(n) for n in sizes]
    assert all(b >= n and b % 16 == 0 for n, b in zip(sizes, buckets))
    assert all(b < 1.25 * n for n, b in zip(sizes, buckets) if n > 128)
    assert buckets == sorted(buckets)
    assert len({b for b in buckets if 512 < b <= 1024}) == 4
    assert len(set(buckets)) == 8 + 4 * 5  # 16..128, then four per doubling up to 4096


@pytest.mark.slow
def test_compiled_pgm_sampler_gives_the_eager_tokens_and_compiles_once():
    model = tiny_pgm(registers=2, length=40, pre_query_mode="learn+freqs+mean")
    prompts = torch.zeros(3, 40, dtype=torch.long)
    prompted = torch.zeros(3, 40, dtype=torch.bool)
    for row, size in enumerate((1, 5, 17)):  # ragged known sets
        prompts[row, :size] = torch.arange(1, size + 1)
        prompted[row, :size] = True
    settings = [
        dict(num_samples=3, steps=8),
        dict(num_samples=2, steps=13, options_seed=1),
        dict(num_samples=3, steps=5, order="confidence"),
        dict(num_samples=4, steps=39, order="left-to-right"),
        dict(known_tokens=prompts, known_mask=prompted, steps=6, counts="binomial"),
        dict(num_samples=3, steps=7, hide_newest=True),
    ]
    before = compilations()
    for index, setting in enumerate(settings):
        seed = setting.pop("options_seed", 0)
        eager = sample_pgm(model, generator=torch.Generator().manual_seed(seed), **setting)
        compiled = sample_pgm(model, generator=torch.Generator().manual_seed(seed), compile="default", **setting)
        assert torch.equal(eager, compiled), setting
        if index == 0:
            first = compilations() - before
            assert first >= 1
    # Every step count, order, batch size and ragged prompt after the first ran the same graph.
    assert compilations() - before == first == 1


@pytest.mark.slow
def test_compiled_image_samplers_and_mdlm_give_the_eager_tokens():
    labels = torch.tensor([0, 2, CLASSES])  # the last row unconditional
    for model in (image_pgm(), tiny_maskgit()):
        before = compilations()
        for guidance in (0.0, 1.5):  # guidance doubles the batch with the null rows
            outs = [generate_codes(model, labels, settings=SamplerSettings(steps=5, guidance=guidance), compile=mode,
                                   generator=torch.Generator().manual_seed(2)) for mode in (None, "default")]
            assert torch.equal(*outs)
        assert compilations() > before
    model = tiny_mdlm(length=24)
    before = compilations()
    outs = [sample_mdlm(model, num_samples=3, steps=9, compile=mode, generator=torch.Generator().manual_seed(4))
            for mode in (None, "default")]
    assert torch.equal(*outs)
    assert compilations() > before


@pytest.mark.parametrize("settings,compile,message", [
    (dict(), "fastest", "compile must be one of default, reduce-overhead"),
    (dict(sampler="reference"), "default", "the reference sampler is the slow check of the efficient one"),
    (dict(cache_refresh=4), "default", "the encoder cache (cache_refresh) is not compiled"),
])
def test_bad_compile_settings_are_refused(settings, compile, message):
    with pytest.raises(ValueError) as error:
        SamplerSettings(**settings).resolve("pgm", "text", unknown=4, compile=compile)
    assert message in str(error.value)


def test_the_loop_does_not_compile_its_reference_view():
    with pytest.raises(ValueError, match="the reference view is the slow check"):
        sample_pgm(tiny_pgm(), num_samples=1, steps=2, compile="default", view="reference")


@pytest.mark.slow
def test_pgm_sample_compile_prints_the_eager_samples(text_run, pgm_main):
    common = ("sample", text_run, "--num-samples", "2", "--steps", "5", "--seed", "3")
    code, eager, err = pgm_main(*common)
    assert code == 0, err
    code, compiled, err = pgm_main(*common, "--compile", "default")
    assert code == 0, err
    assert compiled == eager and eager.strip()
    code, _, err = pgm_main(*common, "--compile", "default", "--cache-refresh", "2")
    assert code == 2 and "the encoder cache (cache_refresh) is not compiled" in err
    code, _, err = pgm_main(*common, "--compile", "default", "--sampler", "reference")
    assert code == 2 and "the reference sampler is the slow check of the efficient one" in err
    code, _, err = pgm_main(*common, "--compile", "fast")
    assert code == 2 and "invalid choice: 'fast'" in err
    code, _, err = pgm_main("eval", text_run, "--compile", "default")
    assert code == 2 and "--compile has no effect here: it applies to the samples of --evaluator" in err


def test_compile_is_refused_for_models_it_does_not_apply_to(tmp_path):
    from pgm.generation import iterate_text
    from pgm.models import CausalConfig, build_model

    model = build_model(CausalConfig(vocab_size=11, length=8, hidden_size=16, num_heads=2, blocks=1, cond_dim=8))
    known = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="compile applies to PGM, MDLM and MaskGIT sampling"):
        iterate_text(model, known_tokens=known, known_mask=known.bool(), compile="default")
