"""The precision a GPU takes (bf16 autocast, and under FSDP2 bf16 parameters with float32 gradient
reductions), run on the CPU with tiny shapes: training of every model kind tracks float32,
sampling, scoring and the encoder cache give valid tokens and float32's numbers, a bf16 run loads
in float32, and two gloo processes train sharded with the bf16 policy.

Tolerances are set from bf16's 8 significant bits: one rounding is off by up to 2^-9 (0.2%)
relatively. Losses, scores and gradient norms are float32 reductions over many bf16 products,
whose rounding errors mostly cancel, so 1% (losses, scores) and 2% (gradient norms, a square root
of a sum of squares of bf16 gradients) are several roundings' worth yet far below what a wrong
precision path (a lost cast, a bf16 reduction of the loss) moves them by."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_mdlm, tiny_pgm
from safetensors.torch import load_file

import pgm
from pgm.presets import preset
from pgm.runs import latest_checkpoint
from pgm.train import train

# Two steps: the first compares the same batch from the same weights; the second adds one bf16
# update, whose drift must stay inside the same tolerance.
SHORT = ["max_steps=2", "log_every=1", "save_every=2", "eval_every=1000", "eval_rows=8"]
TEXT_KINDS = ["text-tiny", "mdlm-tiny", "ar-tiny"]
IMAGE_KINDS = ["vq-tiny", "image-pgm-tiny", "maskgit-tiny"]
LOSS_TOLERANCE, GRAD_NORM_TOLERANCE, SCORE_TOLERANCE = 0.01, 0.02, 0.01
TEXTS = ["the cat sat on the mat", "It was a dark night"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def training_steps(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if "loss" in r]


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """run(preset, precision) -> (run directory, its log lines): two-step runs, each trained once
    for the module. Image runs tokenize with the float32 VQ run, so that both precisions of an
    image model read the same codes."""
    root = tmp_path_factory.mktemp("bf16")
    done = {}

    def run(name: str, precision: str):
        if (name, precision) not in done:
            extra = []
            if name in IMAGE_KINDS:
                from pgm.data.image_sets import load_fashion_mnist
                from pgm.errors import DataError

                try:
                    load_fashion_mnist("test")
                except DataError as error:
                    pytest.skip(str(error))
                extra = ["data.limit_images=32"]
                if name != "vq-tiny":
                    extra.append(f"data.tokenizer=vq:{run('vq-tiny', 'fp32')[0]}")
            lines = []
            out = root / f"{name}-{precision}"
            config = preset(name).with_overrides([*SHORT, f"train.precision={precision}", *extra])
            train(config, out, log=lambda *a: lines.append(" ".join(map(str, a))))
            done[name, precision] = out, lines
        return done[name, precision]

    return run


@pytest.mark.parametrize("name", TEXT_KINDS + IMAGE_KINDS)
def test_bf16_training_tracks_float32(runs, name):
    bf16_dir, lines = runs(name, "bf16")
    assert any("(bf16 autocast)" in line for line in lines), lines
    low, high = training_steps(bf16_dir), training_steps(runs(name, "fp32")[0])
    assert [r["step"] for r in low] == [r["step"] for r in high] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in low)
    # The VQ's codebook lookup is an argmin: one code flipped by a bf16 rounding moves its loss
    # discontinuously (8% apart by step 3 when measured), so only its first step is compared.
    compared = low[:1] if name == "vq-tiny" else low
    for mine, theirs in zip(compared, high):
        assert relative(mine["loss"], theirs["loss"]) < LOSS_TOLERANCE, (mine, theirs)
        assert relative(mine["grad_norm"], theirs["grad_norm"]) < GRAD_NORM_TOLERANCE, (mine, theirs)
    # The zero-initialised output layers make the first loss exactly log-uniform in either
    # precision; the gradients are where bf16 shows, and must show, or autocast never ran.
    assert low[0]["grad_norm"] != high[0]["grad_norm"]
    final = latest_checkpoint(bf16_dir)
    assert final.name == "step_0000002"
    # The master weights stay float32: autocast casts copies for the matmuls only.
    assert {t.dtype for t in load_file(str(final / "model.safetensors")).values()} == {torch.float32}


def valid_text_tokens(pipe, tokens: torch.Tensor) -> bool:
    """Ids the tokenizer can decode: inside the vocabulary and never the mask."""
    return bool(((tokens >= 0) & (tokens < pipe.config.vocab_size) & (tokens != pipe.config.mask_token_id)).all())


@pytest.mark.parametrize("name", TEXT_KINDS)
def test_sampling_and_scoring_in_bf16_match_float32(runs, name):
    run_dir = runs(name, "bf16")[0]
    low, high = pgm.load(run_dir, precision="bf16"), pgm.load(run_dir, precision="fp32")
    assert (low.dtype, high.dtype) == ("bf16 autocast", "float32")
    steps = {} if name == "ar-tiny" else {"steps": 8}
    samples = low.sample(num_samples=2, length=32, seed=3, **steps)
    assert samples.tokens.shape == (2, 32) and valid_text_tokens(low, samples.tokens)
    assert all(isinstance(text, str) and text for text in samples.outputs)
    passes = {} if name == "ar-tiny" else {"passes": 2, "seed": 0}  # the same Monte-Carlo draws in both
    for mine, theirs in zip(low.score(TEXTS, **passes), high.score(TEXTS, **passes)):
        assert math.isfinite(mine.nll) and mine.tokens == theirs.tokens
        assert relative(mine.nll, theirs.nll) < SCORE_TOLERANCE, (mine, theirs)


def test_the_encoder_cache_in_bf16_gives_valid_tokens_and_refreshing_every_step_is_exact(runs):
    pipe = pgm.load(runs("text-tiny", "bf16")[0], precision="bf16")
    request = dict(num_samples=2, length=32, steps=8, seed=3)
    exact = pipe.sample(**request).tokens
    for refresh in (1, 2, "never"):
        cached = pipe.sample(**request, cache_refresh=refresh)
        assert cached.tokens.shape == exact.shape and valid_text_tokens(pipe, cached.tokens), refresh
        assert all(isinstance(text, str) for text in cached.outputs)
    # A refresh at every step re-encodes the whole clean set, as the uncached sampler does, so
    # under bf16 too the two agree token for token.
    assert torch.equal(pipe.sample(**request, cache_refresh=1).tokens, exact)


def test_training_view_logits_under_autocast_are_close_to_float32():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (4, 20), generator=generator)
    groups = torch.rand(4, 20, generator=generator) < 0.5
    for model, call in ((tiny_pgm(), lambda m: m(tokens, groups)), (tiny_mdlm(), lambda m: m(tokens))):
        with torch.no_grad():
            reference = call(model)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = call(model)
        assert low.dtype == torch.bfloat16 and reference.dtype == torch.float32
        assert torch.isfinite(low).all()
        # Measured: 0.6% (PGM) and 0.7% (MDLM) of the largest logit (about 6.8).
        error = float((low.float() - reference).abs().max() / reference.abs().max())
        assert error < 0.02, (type(model).__name__, error)


@pytest.mark.parametrize("query_norm", ["layernorm", "rmsnorm"])
def test_a_pgm_with_bf16_parameters_runs_under_cpu_autocast(query_norm):
    """What FSDP2's MixedPrecisionPolicy(param_dtype=bfloat16) hands a block's forward on CPU: its
    parameters in bf16, its buffers as they were, under bf16 autocast; the same logits as float32.
    The query norm's input is float32 (the position sinusoid is a buffer) and its weight bf16: a mix
    CPU's layer_norm refuses, and CPU autocast, unlike CUDA's, does not lift layer_norm to float32."""
    model = tiny_pgm(query_norm=query_norm)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (4, 20), generator=generator)
    groups = torch.rand(4, 20, generator=generator) < 0.5
    with torch.no_grad():
        reference = model(tokens, groups)
        for parameter in model.parameters():
            parameter.data = parameter.data.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(tokens, groups)
    assert float((low.float() - reference).abs().max() / reference.abs().max()) < 0.02


@pytest.mark.parametrize("name", ["mdlm-tiny", "text-tiny"])
def test_two_gloo_processes_train_sharded_with_bf16_parameters_and_float32_reductions(runs, tmp_path, name):
    """train.precision=bf16 with train.parallel=fsdp: `uses_bf16` is true for an explicit bf16 on
    any device, so `shard` gets bf16_parameters=True on CPU too. The PGM has the default query norm,
    a LayerNorm whose bf16 weight meets a float32 input (the test above)."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pgm",
               "train", "--preset", name, "--out", str(run_dir), *SHORT, "train.parallel=fsdp",
               "train.precision=bf16"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) on cpu (bf16 autocast)" in done.stdout, done.stdout
    sharded, whole = training_steps(run_dir), training_steps(runs(name, "fp32")[0])
    assert [r["step"] for r in sharded] == [1, 2]
    for mine, theirs in zip(sharded, whole):  # the same global batch of 8 rows, split 4 + 4
        assert math.isfinite(mine["loss"]) and relative(mine["loss"], theirs["loss"]) < LOSS_TOLERANCE
        assert relative(mine["grad_norm"], theirs["grad_norm"]) < GRAD_NORM_TOLERANCE
    assert sharded[0]["grad_norm"] != whole[0]["grad_norm"]  # the bf16 parameters did compute
    # The sharded checkpoint holds float32 master weights, and loads and samples in float32.
    pipe = pgm.load(run_dir, precision="fp32")
    assert pipe.dtype == "float32" and all(p.dtype == torch.float32 for p in pipe.model.parameters())
    assert valid_text_tokens(pipe, pipe.sample(num_samples=2, length=32, steps=4, seed=1).tokens)


@pytest.mark.parametrize("name", TEXT_KINDS)
def test_a_checkpoint_saved_from_bf16_training_loads_and_samples_in_float32(runs, name):
    pipe = pgm.load(runs(name, "bf16")[0], precision="fp32")
    assert pipe.dtype == "float32"
    assert all(p.dtype == torch.float32 for p in pipe.model.parameters())
    steps = {} if name == "ar-tiny" else {"steps": 4}
    samples = pipe.sample(num_samples=2, length=32, seed=1, **steps)
    assert valid_text_tokens(pipe, samples.tokens) and all(isinstance(t, str) and t for t in samples.outputs)
