"""The PGM's approximate encoder cache: refresh=1 is exact sampling token for token; a cached
call's logits are a plain transcription's with each token attending only to tokens encoded no
later than itself; the refresh schedule; the options everywhere they are offered."""

import json

import pytest
import reference_forward
import torch
from conftest import tiny_pgm
from test_images import image_pgm

from pgm.bench import Shape, pgm_flops, pgm_step_flops
from pgm.sampling import sample_pgm
from pgm.sampling.codes import generate_codes
from pgm.sampling.settings import SamplerSettings


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def prompts_of_different_lengths(length=20):
    """Three rows: a BOS and prompts of 5, 2 and 8 tokens (a ragged clean set from the start)."""
    tokens = torch.randint(0, 40, (3, length), generator=seeded(5))
    mask = torch.zeros(3, length, dtype=torch.bool)
    for row, known in enumerate((6, 3, 9)):
        mask[row, :known] = True
    return tokens, mask


@pytest.mark.parametrize("order", ["random", "left-to-right", "confidence"])
@pytest.mark.parametrize("counts", ["uniform", "binomial"])
def test_refresh_1_gives_exact_sampling_token_for_token_and_never_does_not(order, counts):
    model = tiny_pgm()
    tokens, mask = prompts_of_different_lengths()
    common = dict(known_tokens=tokens, known_mask=mask, steps=5, order=order, counts=counts)
    exact = sample_pgm(model, generator=seeded(), **common)
    stats = {}
    assert torch.equal(sample_pgm(model, generator=seeded(), cache_refresh=1, stats=stats, **common), exact)
    assert stats == {"forward_calls": 5, "cache_refreshes": 5}
    never = sample_pgm(model, generator=seeded(), cache_refresh="never", stats=stats, **common)
    assert stats["cache_refreshes"] == 1
    assert torch.equal(never[mask], tokens[mask])  # the prompts stay
    assert not torch.equal(never, exact)  # the cache is really used: states differ, so do some draws


def test_refresh_1_is_exact_for_the_guided_image_pgm_and_its_authors_off_by_one():
    model = image_pgm()
    labels = torch.tensor([0, 2, 1])
    for options in ({"guidance": 2.0}, {"guidance": 2.0, "guidance_schedule": "constant"}, {"hide_newest": True},
                    {"sampler": "confidence"}):
        exact = generate_codes(model, labels, settings=SamplerSettings(steps=6, **options), generator=seeded(1))
        cached = generate_codes(model, labels, settings=SamplerSettings(steps=6, cache_refresh=1, **options),
                                generator=seeded(1))
        assert torch.equal(cached, exact), options
        never = generate_codes(model, labels, settings=SamplerSettings(steps=6, cache_refresh="never", **options),
                               generator=seeded(1))
        assert not torch.equal(never, exact), options


def test_inpainting_with_the_cache_keeps_the_known_cells():
    model = image_pgm()
    codes = torch.randint(0, 12, (2, 16), generator=seeded(2))
    cells = torch.zeros(2, 16, dtype=torch.bool)
    cells[0, :8], cells[1, 4:6] = True, True  # ragged: 8 and 2 known cells
    out = generate_codes(model, torch.tensor([1, 1]), known_codes=codes, known_cells=cells, generator=seeded(),
                         settings=SamplerSettings(steps=4, cache_refresh="never", guidance=1.0))
    assert torch.equal(out[cells], codes[cells]) and bool((out < 12).all())


def _stage_masks(stages: torch.Tensor, visible: torch.Tensor):
    """What the cache computes, as masks over every slot: a token attends to tokens encoded at
    the same call or before (stage <= its own); queries read every visible slot."""
    slots = torch.arange(stages.shape[1])
    shown = slots < visible[:, None]  # [B, N]
    encoder = (stages[:, None, :] <= stages[:, :, None]) & shown[:, None, :]
    encoder |= torch.eye(stages.shape[1], dtype=torch.bool)  # hidden slots attend to themselves (never read)
    return encoder, shown


@pytest.mark.parametrize("mode", ["learn+freqs", "learn+freqs+mean"])
def test_a_cached_call_equals_a_plain_encoding_against_the_cached_states(mode):
    """Three calls on a ragged batch: visible 3/5/1, then 7/5/4 (row 1 gains nothing), then
    10/9/6. The third call's logits must be those of the plain transcription in which each token
    attends to the tokens encoded no later than itself; a refresh must be `predict`'s."""
    model = tiny_pgm(pre_query_mode=mode)
    state = {k: v.float() for k, v in model.state_dict().items()}
    generator = seeded(3)
    tokens = torch.randint(0, 40, (3, 21), generator=generator)
    positions = torch.stack([torch.randperm(20, generator=generator) for _ in range(3)])
    positions = torch.cat([positions, torch.zeros(3, 1, dtype=torch.long)], dim=1)  # the sampler's sink column
    queries = positions[:, 14:17]
    calls = [torch.tensor([3, 5, 1]), torch.tensor([7, 5, 4]), torch.tensor([10, 9, 6])]
    stages = torch.full((3, 21), 9)
    for stage, (before, after) in enumerate(zip([torch.zeros(3, dtype=torch.long)] + calls, calls)):
        for row in range(3):
            stages[row, before[row]:after[row]] = stage
    with torch.no_grad():
        cache = model.new_cache()
        for visible in calls:
            ours = model.predict_cached(cache, tokens, positions, visible, queries)
        encoder, shown = _stage_masks(stages[:, :10], calls[-1])
        theirs = reference_forward.pgm_forward(state, 4, 2, 2, tokens[:, :10], positions[:, :10], queries, encoder,
                                               shown[:, None, :].expand(-1, 3, -1), mode)
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
        # nothing new to encode: the call reads every state from the cache
        assert torch.allclose(model.predict_cached(cache, tokens, positions, calls[-1], queries), ours, atol=1e-6)
        plain = reference_forward.pgm_forward(state, 4, 2, 2, tokens[:, :10], positions[:, :10], queries,
                                              shown[:, None, :] & shown[:, :, None] | torch.eye(10, dtype=torch.bool),
                                              shown[:, None, :].expand(-1, 3, -1), mode)
        assert not torch.allclose(ours, plain, atol=1e-3)  # the approximation is not the exact encoder
        refreshed = model.predict_cached(cache, tokens, positions, calls[-1], queries, refresh=True)
        assert torch.allclose(refreshed, plain, atol=1e-5, rtol=1e-5)
        assert torch.equal(refreshed, model.predict(tokens[:, :10], positions[:, :10], queries, calls[-1]))


@pytest.mark.parametrize("calls", [(4, 9), (torch.tensor([4, 2]), torch.tensor([9, 6]))])
def test_a_cached_call_of_the_image_pgm_counts_its_register_and_class(calls):
    """Rows in step (no masks: 4 clean tokens, then 9) and ragged ones (4 and 2, then 9 and 6).
    The register is encoded at the first call and sits before the tokens."""
    model = image_pgm()
    state = {k: v.float() for k, v in model.state_dict().items()}
    generator = seeded(4)
    tokens = torch.randint(0, 12, (2, 17), generator=generator)
    positions = torch.stack([torch.randperm(17, generator=generator) for _ in range(2)])
    queries = positions[:, 12:15]
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        cache = model.new_cache()
        for visible in calls:
            ours = model.predict_cached(cache, tokens, positions, visible, queries, labels)
    first, last = (torch.as_tensor(c).expand(2) for c in calls)
    stages = (torch.arange(9) >= first[:, None]).long()
    encoder, shown = _stage_masks(torch.cat([torch.zeros(2, 1, dtype=torch.long), stages], dim=1), last + 1)
    sequence_positions = torch.cat([torch.ones(2, 1, dtype=torch.long), positions[:, :9] + 2], dim=1)
    theirs = reference_forward.pgm_forward(state, 2, 2, 2, tokens[:, :9], sequence_positions, queries + 2, encoder,
                                           shown[:, None, :].expand(-1, 3, -1), labels=labels,
                                           registers=state["reg_tokens.weight"][1:])
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def _refresh_flags(model, **options):
    flags = []
    original = model.predict_cached

    def recording(*args, refresh=False, **kwargs):
        flags.append(refresh)
        return original(*args, refresh=refresh, **kwargs)

    model.predict_cached = recording
    sample_pgm(model, generator=seeded(), **options)
    return flags


def test_the_refresh_schedule_counts_calls_and_growth():
    model = tiny_pgm(length=25)
    common = dict(num_samples=2, length=25, steps=8)  # from nothing: 3 new tokens per step, clean 0, 3, ..., 21
    assert _refresh_flags(model, cache_refresh=3, **common) == [True, False, False] * 2 + [True, False]
    assert _refresh_flags(model, cache_refresh="never", **common) == [True] + [False] * 7
    # growth 0.5: a refresh once the clean set is more than 1.5x its size at the last one (at 0, 3, 6, 12, 21)
    assert _refresh_flags(model, cache_refresh="never", cache_growth=0.5, **common) == [
        True, True, True, False, True, False, False, True]
    # ragged rows (6, 3 and 9 known, 4 steps) compare their widest clean set: 9, 13, 17, 21
    tokens, mask = prompts_of_different_lengths(25)
    assert _refresh_flags(model, known_tokens=tokens, known_mask=mask, steps=4, cache_refresh=10,
                          cache_growth=0.35) == [True, True, False, True]


@pytest.mark.parametrize("options,message", [
    ({"cache_refresh": 0}, "cache_refresh must be a positive number of steps or 'never', got 0"),
    ({"cache_refresh": "often"}, "cache_refresh must be a positive number of steps or 'never'"),
    ({"cache_refresh": True}, "cache_refresh must be a positive number of steps"),
    ({"cache_growth": 0.5}, "cache_growth refreshes the encoder cache: give cache_refresh too"),
    ({"cache_refresh": 2, "cache_growth": 0}, "cache_growth must be a positive fraction"),
    ({"cache_refresh": 2, "cache_growth": float("inf")}, "cache_growth must be a positive fraction"),
    ({"cache_refresh": 2, "sampler": "reference"}, "the reference sampler runs the training view, which has no "
                                                   "encoder cache"),
    ({"cache_refresh": 2, "compile": "default"}, "the encoder cache (cache_refresh) is not compiled"),
])
def test_bad_cache_settings_are_refused_in_one_sentence(options, message):
    compile = options.pop("compile", None)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplerSettings(**options).resolve("pgm", "text", unknown=8, compile=compile)


def test_the_loop_refuses_a_cache_in_a_view_that_has_none():
    with pytest.raises(ValueError, match=r"the encoder cache \(cache_refresh\) needs a PGM sampled in the efficient"):
        sample_pgm(tiny_pgm(), num_samples=1, steps=2, cache_refresh=2, view="reference")


def test_the_benchmark_counts_a_cached_call_as_its_new_tokens_against_the_whole_clean_set():
    shape = Shape(hidden=8, heads=2, pgm_encoder=2, pgm_decoder=1, vocab=10)
    h, vocab = 8, 10

    def call(clean, encoded, queries):  # by hand: 2 encoder blocks, GroupSwap + 1 decoder layer
        encoder = 2 * encoded * (2 * 12 * h * h + 4 * clean * h)
        per_query = 2 * h * h + 4 * clean * h + (2 * 10 * h * h + 4 * clean * h) + 2 * h * vocab
        return encoder + 2 * encoded * 4 * h * h + queries * per_query

    counts = [2, 3, 4]  # the BOS, then clean sets of 3 and 6 tokens
    assert pgm_step_flops(shape, 6, 4) == call(6, 6, 4)
    assert pgm_flops(shape, 2, 10, counts) == 2 * (call(1, 1, 2) + call(3, 3, 3) + call(6, 6, 4))
    assert pgm_flops(shape, 2, 10, counts, "never") == 2 * (call(1, 1, 2) + call(3, 2, 3) + call(6, 3, 4))
    assert pgm_flops(shape, 2, 10, counts, 2) == 2 * (call(1, 1, 2) + call(3, 2, 3) + call(6, 6, 4))
    # growth 1: a refresh once the clean set is more than twice its size at the last one (3 > 2, not 6 > 6)
    assert pgm_flops(shape, 2, 10, counts, "never", 1.0) == 2 * (call(1, 1, 2) + call(3, 3, 3) + call(6, 3, 4))


def test_bench_sampling_runs_the_cached_pgm_beside_the_exact_one(tmp_path, pgm_main):
    code, out, _ = pgm_main("bench", "sampling", "--models", "pgm", "pgm-cache", "--cache-refresh", "2", "never",
                            "--cache-growth", "0.5", "--lengths", "16", "--steps", "4", "--batch-size", "2", "--hidden", "32", "--heads", "2",
                            "--pgm-blocks", "1", "1", "--vocab", "64", "--repeats", "1", "--warmup", "0", "--out-dir",
                            tmp_path)
    assert code == 0
    rows = {(row["model"], row["cache_refresh"], row["cache_growth"]): row
            for row in json.loads((tmp_path / "sampling.json").read_text())["results"]}
    assert set(rows) == {("pgm", None, None), ("pgm-cache", 2, None), ("pgm-cache", "never", None),
                         ("pgm-cache", "never", 0.5)}
    # clean sets of 1, 4, 8 and 12 tokens: every 2 steps refreshes twice, growth 0.5 at 1, 4 and 8
    assert {key[1:]: row["cache_refreshes"] for key, row in rows.items()} == {
        (None, None): None, (2, None): 2, ("never", None): 1, ("never", 0.5): 3}
    exact, every_2, never = rows[("pgm", None, None)], rows[("pgm-cache", 2, None)], rows[("pgm-cache", "never", None)]
    assert every_2["forward_calls"] == 4 and exact["ratio_to_pgm"] == 1
    assert every_2["ratio_to_pgm"] == every_2["tokens_per_s"] / exact["tokens_per_s"]
    assert never["gflops_per_batch"] < every_2["gflops_per_batch"] < exact["gflops_per_batch"]
    table = [line.split() for line in out.splitlines() if line.startswith("pgm")]
    assert [(line[0], *line[2:5]) for line in table[-4:]] == [
        ("pgm", "16", "4", "-"), ("pgm-cache", "16", "4", "2"), ("pgm-cache", "16", "4", "never"),
        ("pgm-cache", "16", "4", "g0.5")]
    code, out, err = pgm_main("bench", "sampling", "--models", "pgm", "pgm-cache", "--cache-growth", "-1", "--out-dir",
                              tmp_path)
    assert code == 2 and "cache_growth must be a positive fraction of the clean set, got -1.0" in err
    assert "matmul throughput" not in out  # refused before anything ran
    code, _, err = pgm_main("bench", "sampling", "--cache-refresh", "2", "--out-dir", tmp_path)
    assert code == 2 and "--cache-refresh and --cache-growth apply to the pgm-cache model of bench sampling" in err


def test_pgm_sample_takes_the_cache_and_refuses_it_where_it_does_not_apply(text_run, pgm_main, tmp_path):
    def sample(*options):
        return pgm_main("sample", text_run, "--prompt", "The", "--num-samples", "2", "--steps", "8", "--seed", "3",
                        *options)

    exact = sample()
    assert exact[0] == 0
    assert sample("--cache-refresh", "1")[1] == exact[1]
    code, out, _ = sample("--cache-refresh", "never", "--cache-growth", "0.5")
    assert code == 0 and out.count("=== sample") == 2
    for options, message in ((["--cache-refresh", "0"], "cache_refresh must be a positive number of steps"),
                             (["--cache-refresh", "soon"], "invalid refresh_interval value: 'soon'"),
                             (["--cache-growth", "0.5"], "give cache_refresh too"),
                             (["--sampler", "reference", "--cache-refresh", "2"], "the reference sampler runs the "
                                                                                  "training view")):
        code, _, err = sample(*options)
        assert code == 2 and message in err and "Traceback" not in err, (options, err)


def test_pgm_report_refuses_a_bad_refresh_before_measuring_anything(text_run, pgm_main, tmp_path):
    code, out, err = pgm_main("report", text_run, "--evaluator", text_run, "--cache-refresh", "0", "--out",
                              tmp_path / "report")
    assert code == 2 and "cache_refresh must be a positive number of steps or 'never', got 0" in err
    assert not (tmp_path / "report").exists() and "validation perplexity" not in out + err
