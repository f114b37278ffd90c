"""Generative perplexity and the comparison report, on cases with known answers."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import tiny_pgm

from pgm.data.tokenizers import train_bpe
from pgm.eval import generative_perplexity, load_evaluator, unigram_entropy
from pgm.eval.generative import ratio_stderr, same_tokenizer
from pgm.models import CausalConfig, CausalTransformer
from pgm.objectives import AutoregressiveObjective
from pgm.sampling.settings import SamplerSettings

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT], vocab_size=300)


def ar_evaluator_dir(directory, tokenizer, *, length=24, train_on=None, steps=0):
    """A saved AR model; fresh (zero output layer: uniform over the V-1 non-mask ids) or fitted
    to the sequence `train_on` for `steps` steps."""
    torch.manual_seed(0)
    model = CausalTransformer(CausalConfig(vocab_size=tokenizer.model_vocab_size, length=length, hidden_size=32,
                                           num_heads=2, blocks=2, cond_dim=16, dropout=0.0))
    if steps:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        rows = torch.tensor([train_on])
        for _ in range(steps):
            loss = AutoregressiveObjective().loss(model, rows).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval().save_pretrained(directory, tokenizer=tokenizer)
    return directory


def test_the_standard_error_of_a_per_token_mean_by_hand():
    # mean 15 / 6 = 2.5; residuals -0.5, -1, 1.5; sqrt(3.5 / 6) / mean count 2
    assert math.isclose(ratio_stderr([2.0, 4.0, 9.0], [1, 2, 3]), math.sqrt(3.5 / 6) / 2)
    assert ratio_stderr([3.0], [4]) == 0.0


def test_unigram_entropy_known_values():
    assert unigram_entropy([7] * 10) == 0.0
    assert math.isclose(unigram_entropy([1, 2, 3, 4]), math.log(4))
    assert math.isclose(unigram_entropy([1, 1, 2, 2]), math.log(2))
    assert unigram_entropy([]) == 0.0


def test_a_uniform_evaluator_gives_perplexity_v_minus_one_on_any_text(tokenizer, tmp_path):
    evaluator = load_evaluator(str(ar_evaluator_dir(tmp_path / "uniform", tokenizer)))
    ids = tokenizer.encode_batch([TEXT[:400]])[0]
    assert len(ids) > 2 * evaluator.context  # scored in several windows
    nll, counts = evaluator.score([ids, ids[:5], []])
    assert counts == [len(ids), 5, 0]
    for total, count in zip(nll[:2], counts[:2]):
        assert math.isclose(math.exp(total / count), tokenizer.model_vocab_size - 1, rel_tol=1e-5)


def test_a_model_finds_the_text_it_memorised_likely_and_a_shuffle_of_it_unlikely(tokenizer, tmp_path):
    ids = [tokenizer.bos_id] + tokenizer.encode_batch(["It was the best of times, it was the worst of times"])[0]
    evaluator = load_evaluator(str(ar_evaluator_dir(tmp_path / "fitted", tokenizer, train_on=ids, steps=150)))
    shuffled = [ids[i] for i in torch.randperm(len(ids) - 1, generator=torch.Generator().manual_seed(0)) + 1]
    (own, shuffle), (count, _) = evaluator.score([ids[1:], shuffled])
    assert math.exp(own / count) < 1.5
    assert math.exp(shuffle / count) > 10


def test_samples_are_retokenized_only_when_the_tokenizers_differ(tokenizer, tmp_path):
    evaluator = load_evaluator(str(ar_evaluator_dir(tmp_path / "same", tokenizer)))
    other = train_bpe([TEXT], vocab_size=280)
    assert same_tokenizer(tokenizer, evaluator.tokenizer) and not same_tokenizer(other, evaluator.tokenizer)
    first, second = other.encode_batch(["it was the age of wisdom", "the epoch of belief"])
    samples = torch.tensor([[other.bos_id] + first + [other.eos_id] + second])
    same = evaluator.sequences_from_samples(samples, evaluator.tokenizer)
    assert same == [samples[0, 1:].tolist()]  # ids kept as they are
    [retokenized] = evaluator.sequences_from_samples(samples, other)
    eos = retokenized.index(evaluator.tokenizer.eos_id)
    assert evaluator.tokenizer.decode(retokenized[:eos]) == "it was the age of wisdom"
    assert evaluator.tokenizer.decode(retokenized[eos + 1:]) == "the epoch of belief"


def test_generative_perplexity_of_samples_under_a_uniform_evaluator(tokenizer, tmp_path):
    evaluator = load_evaluator(str(ar_evaluator_dir(tmp_path / "uniform", tokenizer)))
    model = tiny_pgm(vocab_size=tokenizer.model_vocab_size, length=20)
    run = dict(num_samples=5, batch_size=2, seed=3)
    result = generative_perplexity(model, tokenizer, evaluator, settings=SamplerSettings(steps=7), **run)
    assert math.isclose(result.perplexity, tokenizer.model_vocab_size - 1, rel_tol=1e-5)
    assert result.generated_tokens == 5 * 19 and result.evaluator_tokens == 5 * 19
    assert 0 < result.entropy <= math.log(19)
    assert result.nll_stderr < 1e-9  # every token costs log(V - 1): no spread between samples
    again = generative_perplexity(model, tokenizer, evaluator, settings=SamplerSettings(steps=7), **run)
    assert again.entropy == result.entropy and result.steps == 7  # the seed fixes the samples
    cached = [generative_perplexity(model, tokenizer, evaluator, settings=SamplerSettings(steps=7, cache_refresh=refresh),
                                    **run).entropy for refresh in (1, "never")]
    assert cached[0] == result.entropy and cached[1] != result.entropy


def test_a_hugging_face_causal_lm_scores_like_our_own(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RawTokenizer

    directory = tmp_path / "hf-gpt2"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=RawTokenizer.from_str(tokenizer.tokenizer.to_str()),
                                                eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied to the output: uniform predictions
    model.save_pretrained(directory)
    evaluator = load_evaluator(f"hf:{directory}")
    assert evaluator.context == 16 and evaluator.tokenizer.bos_id == tokenizer.bos_id
    ids = tokenizer.encode_batch([TEXT[:200]])[0]
    [nll], [count] = evaluator.score([ids])
    assert count == len(ids) and math.isclose(math.exp(nll / count), tokenizer.vocab_size, rel_tol=1e-5)


def test_missing_evaluators_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_evaluator(str(tmp_path / "nothing"))
    tiny_pgm().save_pretrained(tmp_path / "pgm")
    with pytest.raises(ValueError, match="needs an autoregressive one"):
        load_evaluator(str(tmp_path / "pgm"))


def test_report_trains_presets_on_a_token_budget_and_writes_its_tables(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "pgm", "report", "text-tiny", "mdlm-tiny", "ar-tiny", "--evaluator", "ar-tiny",
         "--tokens", "2560", "--steps", "4", "16", "64", "--num-samples", "4", "--batch-size", "2", "--passes", "2",
         "--cache-refresh", "2", "never", "--cache-growth", "0.5", "--out", str(out)], capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    runs = {run["kind"]: run for run in report["runs"]}
    assert set(runs) == {"pgm", "mdlm", "ar"}
    assert all(run["tokens_seen"] == 10 * 8 * 32 for run in runs.values())  # 2560 tokens = 10 steps of 8 x 32
    # at most one step per position; each step count exact, then with the cache refreshed every 2 steps, never,
    # and whenever the clean set has grown by half
    assert [(row["steps"], row["cache_refresh"], row["cache_growth"]) for row in runs["pgm"]["samples"]] == [
        (steps, *cache) for steps in (4, 16, 31) for cache in ((None, None), (2, None), ("never", None), ("never", 0.5))]
    assert all(row["cache_refresh"] is None for row in runs["mdlm"]["samples"])
    assert "| 31 (64 asked) |" in (out / "report.md").read_text()
    for row in runs["mdlm"]["samples"]:  # the paper's MDLM (logits everywhere) draws the same samples
        assert math.isclose(row["gen_ppl_logits_everywhere"], row["gen_ppl"], rel_tol=1e-6)
    assert [row["steps"] for row in runs["mdlm"]["samples"]] == [4, 16, 64]
    assert [row["steps"] for row in runs["ar"]["samples"]] == [31] and runs["ar"]["self_scored"]
    assert [t["what"].split(",")[0] for t in report["targets"]][:1] == ["PGM validation perplexity / MDLM's"]
    assert sum("tokens/s of the fastest cache" in t["what"] for t in report["targets"]) == 3  # one per step count
    markdown = (out / "report.md").read_text()
    for run in report["runs"]:
        for row in run["samples"]:
            cache = ("-" if row["cache_refresh"] is None else f"refresh at growth {row['cache_growth']}"
                     if row["cache_growth"] else f"refresh {row['cache_refresh']}")
            assert f" | {cache} | {row['gen_ppl']:.2f} | {row['entropy']:.3f} | {row['tokens_per_s']:.1f} |" in markdown
            assert f" | {row['nll']:.3f} +- {row['nll_stderr']:.3f} |" in markdown
            assert math.isclose(math.exp(row["nll"]), row["gen_ppl"], rel_tol=1e-9) and row["nll_stderr"] > 0
    assert (out / "frontier.png").stat().st_size > 0 and (out / "steps.png").stat().st_size > 0
    assert "| target | measured | goal | met |" in result.stdout
    for target in report["targets"]:  # each target's row says what the JSON says
        assert (f"| {target['what']} | {target['value']:.3f} | {target['goal']} | "
                f"{'yes' if target['met'] else '**no**'} |") in markdown


def test_report_targets_are_the_ratios_of_the_measured_rows():
    from pgm.report import check_targets

    def row(steps, gen_ppl, entropy, speed, full=None):
        return {"steps": steps, "asked_steps": steps, "gen_ppl": gen_ppl, "entropy": entropy, "tokens_per_s": speed,
                "tokens_per_s_logits_everywhere": full}

    pgm = {"kind": "pgm", "val_ppl": 100.0, "samples": [row(16, 50.0, 4.0, 800.0), row(128, 40.0, 4.06, 300.0)]}
    mdlm = {"kind": "mdlm", "val_ppl": 99.0, "samples": [row(16, 60.0, 4.0, 100.0, 80.0),
                                                          row(128, 50.0, 4.0, 100.0, 60.0)]}
    got = {t["what"].split(",")[0].split(" (")[0]: (t["value"], t["met"]) for t in check_targets([pgm, mdlm])}
    assert got["PGM validation perplexity / MDLM's"] == (pytest.approx(100 / 99), True)
    assert got["generative perplexity"] == (pytest.approx(0.8), True)
    assert got["sample entropy"] == (pytest.approx(1.015), True)
    assert got["sampling throughput PGM / MDLM"] == (pytest.approx(3.0), False)  # at 128: 300 / 100
    assert got["the same against MDLM with logits at every position"] == (pytest.approx(5.0), True)  # 300 / 60


def test_the_cache_target_takes_the_fastest_refresh_as_good_as_exact_sampling():
    from pgm.report import cache_targets, check_targets

    def row(refresh, gen_ppl, entropy, speed):
        return {"steps": 64, "asked_steps": 64, "cache_refresh": refresh, "gen_ppl": gen_ppl, "entropy": entropy,
                "tokens_per_s": speed}

    samples = [row(None, 100.0, 4.0, 100.0), row(2, 105.0, 4.05, 180.0), row(4, 101.0, 3.9, 300.0),
               row("never", 120.0, 4.0, 500.0)]  # refresh 4: entropy 2.5% off; never: perplexity 20% worse
    (target,) = cache_targets([{"kind": "pgm", "name": "p", "samples": samples}])
    assert target["value"] == pytest.approx(1.8) and not target["met"] and "(refresh 2)" in target["what"]
    assert check_targets([{"kind": "pgm", "name": "p", "samples": samples}]) == [target]  # no MDLM needed
    samples[1]["gen_ppl"] = 111.0  # now nothing qualifies
    (target,) = cache_targets([{"kind": "pgm", "name": "p", "samples": samples}])
    assert target["value"] == 0.0 and "none qualifies" in target["what"]
