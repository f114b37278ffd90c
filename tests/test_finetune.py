"""Starting a run from other weights (train.init_from) and fine-tuning on (prompt, response) pairs."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_mdlm, tiny_pgm

import pgm
from pgm.data import load_prepared
from pgm.data.config import DataConfig
from pgm.data.pairs import COPY_PROMPT, copy_task_pairs, pack_pairs, read_pairs
from pgm.data.tokenizers import Tokenizer
from pgm.errors import ConfigError, DataError, RunError
from pgm.eval.perplexity import seed_for
from pgm.initial_weights import InitialModel, check_fits, initial_state, load_initial_state
from pgm.models import CausalConfig, CausalTransformer, MaskGITConfig, MaskGITTransformer
from pgm.objectives import AutoregressiveObjective, MaskedDiffusionObjective, PartitionObjective, draw_noise
from pgm.objectives.losses import always_clean_mask
from pgm.runs import latest_checkpoint
from pgm.train import RowSchedule, train

QUIET = {"log": lambda *a: None}


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the given positions ---------------------------------------------------------------------

def test_always_clean_mask_by_hand():
    tokens = torch.zeros(3, 5, dtype=torch.long)
    given = torch.tensor([1, 3, 0])
    assert always_clean_mask(tokens, None, False) is None
    assert always_clean_mask(tokens, None, True).tolist() == [[True, False, False, False, False]] * 3
    assert always_clean_mask(tokens, given, False).tolist() == [[True, False, False, False, False],
                                                                [True, True, True, False, False],
                                                                [False] * 5]
    assert always_clean_mask(tokens, given, True)[2].tolist() == [True, False, False, False, False]


class _Words(Tokenizer):
    """Ids by hand: 0 BOS/EOS, 1 PAD, 2.. words, mask last."""

    kind = "words"

    def __init__(self):
        super().__init__(vocab_size=40, bos_id=0, eos_id=0, pad_id=1, mask_id=40)


def test_pairs_are_packed_one_per_row_with_their_given_count():
    tokenizer = _Words()
    prompts = [np.array([5, 6]), np.array([7]), np.array([8, 9, 10])]
    responses = [np.array([11]), np.array([12, 13, 14, 15, 16]), np.array([17])]
    rows, lengths, given, cut = pack_pairs(prompts, responses, 6, tokenizer, "cut")
    assert rows.tolist() == [[0, 5, 6, 11, 0, 0],  # EOS, then EOS to fill the row
                             [0, 7, 12, 13, 14, 15],  # cut: the response's end and its EOS
                             [0, 8, 9, 10, 17, 0]]
    assert lengths.tolist() == [5, 6, 6] and given.tolist() == [3, 2, 4] and cut == 1
    with pytest.raises(DataError, match="pair 1 has 1 prompt and 5 response tokens.*too_long=refuse"):
        pack_pairs(prompts, responses, 6, tokenizer, "refuse")
    with pytest.raises(DataError, match="pair 2 .*no room for a response"):
        pack_pairs(prompts, [np.array([1])] * 3, 5, tokenizer, "cut")


def test_reading_pairs_names_the_line_and_field_at_fault(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text('{"q": "a", "a": "b"}\n\n{"q": "c", "a": "d"}\n')
    config = DataConfig(source=str(good), format="pairs", packing="pad", prompt_field="q", response_field="a")
    assert read_pairs(config) == [("a", "b"), ("c", "d")]
    with pytest.raises(DataError, match=r"pairs.jsonl:1 has no text field 'prompt'"):
        read_pairs(config.replace(prompt_field="prompt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "a", "a": "b"}\n{"q": 3, "a": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 has no text field 'q'"):
        read_pairs(config.replace(source=str(bad)))
    with pytest.raises(ConfigError, match="set data.packing=pad"):
        DataConfig(format="pairs")


def test_the_copy_task_repeats_consecutive_words_of_the_corpus():
    pairs = copy_task_pairs(50)
    assert len(pairs) == 50 and pairs == copy_task_pairs(50)
    words = set()
    for prompt, response in pairs:
        phrase = response[1:]
        assert prompt == COPY_PROMPT.format(phrase=phrase) and len(phrase.split()) == 3
        words.update(phrase.split())
    assert {"the", "and", "of"} <= words and len(words) > 60


# --- the prompt is clean and unscored in every objective ---------------------------------------

def _pair_batch(vocab: int, length: int = 12):
    tokens = torch.randint(2, vocab - 1, (4, length), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    given = torch.tensor([4, 2, 6, 3])
    valid = torch.arange(length)[None, :] < torch.tensor([10, 12, 9, 8])[:, None]
    return tokens, given, valid


def test_the_prompt_is_never_masked_hidden_or_scored():
    pgm_model, mdlm = tiny_pgm(vocab_size=41, length=12), tiny_mdlm(vocab_size=41, length=12)
    tokens, given, valid = _pair_batch(41)
    clean = always_clean_mask(tokens, given, True)
    responses = (valid & ~clean).sum(1)
    seen = {}
    pgm_model.register_forward_pre_hook(lambda module, args: seen.__setitem__("groups", args[1]))
    mdlm.register_forward_pre_hook(lambda module, args: seen.__setitem__("noisy", args[0]))
    for seed in range(20):  # times close to 1 hide nearly everything else
        noise = draw_noise(4, 12, generator=torch.Generator().manual_seed(seed))
        noise.t[:] = 0.999
        out = PartitionObjective().loss(pgm_model, tokens, valid=valid, always_clean=clean, noise=noise)
        assert not seen["groups"][clean].any() and seen["groups"][~clean].float().mean() > 0.8
        assert out.row_tokens.tolist() == responses.tolist()
        out = MaskedDiffusionObjective().loss(mdlm, tokens, valid=valid, always_clean=clean, noise=noise)
        assert torch.equal(seen["noisy"][clean], tokens[clean]) and (seen["noisy"][~clean] == 40).float().mean() > 0.8
        assert out.row_tokens.tolist() == responses.tolist()


def test_a_prompted_pgm_row_is_trained_on_the_view_that_sees_its_prompt():
    """The swapped view would predict the response from the group without the prompt: a prompted
    row's loss is the view that sees it, twice weighted (= its ELBO); a row given only its BOS
    keeps both views."""
    model = tiny_pgm(vocab_size=41, length=12)
    tokens, given, valid = _pair_batch(41)
    noise = draw_noise(4, 12, generator=torch.Generator().manual_seed(3))
    noise.t[:] = 0.6  # both groups of every row hold response tokens
    objective = PartitionObjective()
    prompted = always_clean_mask(tokens, given, True)
    loss = objective.loss(model, tokens, valid=valid, always_clean=prompted, noise=noise)
    elbo = objective.elbo(model, tokens, valid=valid, always_clean=prompted, noise=noise)
    assert torch.allclose(loss.row_nll, elbo.row_nll) and loss.row_nll.gt(0).all()
    bos_only = always_clean_mask(tokens, None, True)
    loss = objective.loss(model, tokens, valid=valid, always_clean=bos_only, noise=noise)
    elbo = objective.elbo(model, tokens, valid=valid, always_clean=bos_only, noise=noise)
    assert not torch.allclose(loss.row_nll, elbo.row_nll, rtol=1e-3)


def test_the_autoregressive_loss_scores_only_the_response():
    torch.manual_seed(0)
    model = CausalTransformer(CausalConfig(vocab_size=41, length=12, hidden_size=32, num_heads=4, blocks=2,
                                           cond_dim=16, dropout=0.0)).eval()
    tokens, given, valid = _pair_batch(41)
    clean = always_clean_mask(tokens, given, True)
    out = AutoregressiveObjective().loss(model, tokens, valid=valid, always_clean=clean)
    logits = model(tokens[:, :-1]).float()
    logits[..., 40] = float("-inf")
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    scored = (valid & ~clean)[:, 1:]  # the targets: the response and its EOS, never the prompt
    assert torch.allclose(out.loss, nll[scored].mean(), atol=1e-6)
    assert out.tokens == scored.sum() == (valid & ~clean).sum()


# --- init_from ---------------------------------------------------------------------------------

def test_a_run_from_another_starts_with_its_weights_and_a_fresh_optimizer(text_run, tmp_path):
    """The first loss of the new run is the source's loss on the same rows and noise; the
    optimizer, schedule and step start at zero; the recipe records where it started."""
    out = tmp_path / "continued"
    config = tiny_config(max_steps=2, init_from=str(text_run), warmup_steps=2, ema=0.0)
    train(config, out, **QUIET)
    start, first = records(out)[:2]
    assert start["step"] == 0 and "val_nll" in start  # the source's weights, validated before the first step
    source = pgm.from_pretrained(text_run)  # the average, what the source samples with
    data = load_prepared(out)
    tc = config.train
    rows = RowSchedule(len(data.train), tc.seed).rows(0, tc.batch_size)
    tokens, _ = data.train[rows]
    objective = PartitionObjective()
    noise = objective.draw_noise(len(rows), source.config.length, generator=torch.Generator().manual_seed(
        seed_for(tc.seed, 0)))
    torch.manual_seed(seed_for(tc.seed, 0, 0, 1))
    expected = objective.loss(source.train(), tokens, always_clean=always_clean_mask(tokens, None, True), noise=noise)
    assert first["step"] == 1 and first["loss"] == pytest.approx(float(expected.loss.detach()), rel=1e-5)
    assert first["lr"] == pytest.approx(tc.lr / 2)  # warm-up starts again
    checkpoint = latest_checkpoint(out)
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {2}  # not the source's 20 + 2
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["init_from"] == str(text_run) and saved["data"]["tokenizer"] == "init_from"
    assert load_prepared(out).tokenizer.identity() == load_prepared(text_run).tokenizer.identity()
    # resuming continues the run itself; the source is not read again
    train(config.with_overrides(["train.max_steps=3"]), out, resume=True, **QUIET)
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3]


def test_a_rotary_model_changes_its_row_length_and_a_learned_grid_does_not(text_run, tmp_path):
    out = tmp_path / "longer"
    train(tiny_config(max_steps=1, init_from=str(text_run), length=48), out, **QUIET)
    assert pgm.from_pretrained(out).config.length == 48
    torch.manual_seed(0)
    small = MaskGITTransformer(MaskGITConfig(codebook_size=16, grid_size=4, num_classes=3, hidden_size=32,
                                             depth=1, num_heads=2, mlp_dim=64))
    larger = MaskGITTransformer(small.config.replace(grid_size=5))
    with pytest.raises(ConfigError, match=r"pos_emb.weight is \(16, 32\) there and \(25, 32\) in this run .*grid"):
        load_initial_state(InitialModel("maskgit-run", small, None), larger)


def test_the_vocabulary_grows_only_when_asked_with_new_rows_from_the_mean():
    source = tiny_pgm(vocab_size=41)  # ids 0..39, mask 40
    grown = tiny_pgm(vocab_size=44)
    initial = InitialModel("small-run", source, None)
    with pytest.raises(ConfigError, match=r"vocabulary \(44 ids\) is larger .*\(41\): set train.init_resize_vocab"):
        check_fits(initial, grown.config, resize=False)
    with pytest.raises(ConfigError, match="can grow, not shrink"):
        check_fits(InitialModel("big", grown, None), source.config, resize=True)
    check_fits(initial, grown.config, resize=True)
    state = initial_state(initial, grown)
    old = source.state_dict()
    for name, tensor in state.items():
        if tensor.shape != old[name].shape:
            assert tensor.shape[0] == 44
            assert torch.equal(tensor[:40], old[name][:40])
            assert torch.equal(tensor[43], old[name][40])  # the mask row moves to the new mask id
            assert torch.allclose(tensor[40:43], old[name][:40].mean(0).expand(3, *tensor.shape[1:]))
    assert sum(state[n].shape != old[n].shape for n in state) >= 1
    grown.load_state_dict(state)


def test_init_from_refusals_are_one_sentence(text_run, tmp_path):
    source = tiny_pgm()
    with pytest.raises(ConfigError, match=r"has another shape .*\(hidden_size\): set model.hidden_size=32$"):
        check_fits(InitialModel("run", source, None), tiny_pgm(hidden_size=64).config, resize=False)
    with pytest.raises(ConfigError, match="holds a text mdlm model; this run trains a text pgm model"):
        check_fits(InitialModel("run", tiny_mdlm(), None), source.config, resize=False)
    image = tiny_pgm(num_classes=3).config
    with pytest.raises(ConfigError, match="holds an image pgm model; this run trains a text pgm model"):
        check_fits(InitialModel("run", tiny_pgm(num_classes=3), None), source.config, resize=False)
    with pytest.raises(ConfigError, match="holds a text pgm model; this run trains an image pgm model"):
        check_fits(InitialModel("run", source, None), image, resize=False)
    with pytest.raises(ConfigError, match="not the tokenizer .* was trained with"):
        train(tiny_config(init_from=str(text_run), tokenizer="gpt2"), tmp_path / "other", **QUIET)
    assert not (tmp_path / "other" / "data").exists()  # refused before any work
    with pytest.raises(RunError, match="train.init_from, which is not set"):
        train(tiny_config(tokenizer="init_from"), tmp_path / "unset", **QUIET)


# --- fine-tuning on pairs ----------------------------------------------------------------------

def test_a_pairs_run_gives_the_prompt_in_training_and_validation(text_run, tmp_path):
    """The first loss and the validation bound of a run on pairs, computed here from the rows:
    training gives BOS + prompt and learns every position after them (the EOS fill too);
    validation scores the response and its EOS only."""
    copy_pairs(load_prepared(text_run).tokenizer, tmp_path / "copy.jsonl")
    out = tmp_path / "pairs"
    config = tiny_config(init_from=str(text_run), format="pairs", packing="pad", source=str(tmp_path / "copy.jsonl"),
                         limit_documents=0, max_steps=1, eval_rows=0, ema=0.0)
    train(config, out, **QUIET)
    start, first = records(out)[:2]
    source, data, tc = pgm.from_pretrained(text_run), load_prepared(out), config.train
    rows = RowSchedule(len(data.train), tc.seed).rows(0, tc.batch_size)
    tokens, valid = data.train[rows]
    given = data.train.given_of(rows)
    assert valid is not None and not valid.all() and (given > 1).all()
    objective = PartitionObjective()
    noise = objective.draw_noise(len(rows), 32, generator=torch.Generator().manual_seed(seed_for(tc.seed, 0)))
    expected = objective.loss(source.train(), tokens, always_clean=always_clean_mask(tokens, given, True), noise=noise)
    assert first["loss"] == pytest.approx(float(expected.loss.detach()), rel=1e-5)
    total, count = 0.0, 0
    indices = list(range(len(data.val)))
    for b, start_row in enumerate(range(0, len(indices), tc.batch_size)):
        chunk = indices[start_row:start_row + tc.batch_size]
        tokens, valid = data.val[chunk]
        noise = objective.draw_noise(len(chunk), 32, generator=torch.Generator().manual_seed(seed_for(tc.seed, 0, b)))
        out_b = objective.elbo(source.eval(), tokens, valid=valid,
                               always_clean=always_clean_mask(tokens, data.val.given_of(chunk), True), noise=noise)
        total, count = total + float(out_b.nll_sum), count + int(out_b.tokens)
    scored = sum(int(length - g) for length, g in zip(data.val.lengths, data.val.given))
    assert start["step"] == 0 and count == scored and start["val_nll"] == pytest.approx(total / count, rel=1e-5)


def copy_pairs(tokenizer, path):
    """Two words to repeat, each one token of the tokenizer: the copy task at a tiny model's scale."""
    words = sorted(w[1:] for w in tokenizer.tokenizer.get_vocab() if w.startswith("Ġ") and w[1:].isalpha()
                   and len(w) > 2)
    pairs = [(f"Repeat: {a} {b}\nAnswer:", f" {a} {b}") for a in words for b in words if a != b]
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return pairs


def test_a_fine_tuned_model_learns_to_copy_what_its_base_did_not(tmp_path):
    """A text-tiny base (64 wide) fine-tuned on a copy task: the response-only validation bound
    drops by nats, and greedy answers to held-out prompts repeat the words, which the base's never do."""
    wider = {"hidden_size": 64, "num_heads": 4}
    base = tmp_path / "base"
    train(tiny_config(**wider), base, **QUIET)
    pairs = copy_pairs(load_prepared(base).tokenizer, tmp_path / "copy.jsonl")
    held_out = pairs[19::20][:32]
    settings = dict(init_from=str(base), format="pairs", packing="pad", source=str(tmp_path / "copy.jsonl"),
                    limit_documents=0, eval_rows=0, ema=0.0, warmup_steps=10, lr=3e-3, length=20, **wider)
    tuned = tmp_path / "copy"
    train(tiny_config(max_steps=700, eval_every=700, save_every=700, log_every=100, **settings), tuned, **QUIET)
    data = load_prepared(tuned)
    assert data.train.given is not None and data.meta["val_rows"] == len(pairs) // 20
    validated = [r for r in records(tuned) if "val_nll" in r]
    assert [r["step"] for r in validated] == [0, 700]  # the base's weights on these rows, then the tuned ones
    assert validated[1]["val_nll"] < validated[0]["val_nll"] - 2.0

    def words_repeated(pipe) -> float:
        prompts = [prompt for prompt, _ in held_out]
        texts = pipe.generate(prompt=prompts, temperature=0, stop_at_eos=True, seed=0)
        return float(np.mean([a == b for text, prompt, (_, answer) in zip(texts, prompts, held_out)
                              for a, b in zip(text[len(prompt):].split() or [""] * 2, answer.split())]))

    assert words_repeated(pgm.load(tuned)) >= 0.5 > words_repeated(pgm.load(base)) == 0.0


def test_bad_fine_tuning_inputs_are_one_sentence_on_the_command_line(text_run, tmp_path, pgm_main):
    no_fields = tmp_path / "no-fields.jsonl"
    no_fields.write_text('{"question": "a", "answer": "b"}\n')
    cases = [
        (["data.format=pairs", "data.packing=pad", f"data.source={no_fields}"], "no-fields.jsonl:1 has no text field"),
        (["data.format=pairs"], "set data.packing=pad"),
        ([f"train.init_from={tmp_path / 'nowhere'}"], "does not exist"),
        (["train.init_from=" + str(text_run), "model.hidden_size=64"], "set model.hidden_size=32"),
        (["train.logger=neptune"], "logger must be one of"),
    ]
    for overrides, expected in cases:
        code, out, err = pgm_main("train", "--preset", "text-tiny", "--out", tmp_path / "run", *overrides)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0] and "Traceback" not in err, (overrides, err)
        assert not (tmp_path / "run" / "data").exists()


def test_a_tracked_pairs_run_logs_its_answers_to_validation_prompts(text_run, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    copy_pairs(load_prepared(text_run).tokenizer, tmp_path / "copy.jsonl")
    out = tmp_path / "tracked"
    train(tiny_config(init_from=str(text_run), format="pairs", packing="pad", source=str(tmp_path / "copy.jsonl"),
                      limit_documents=0, max_steps=4, eval_every=4, log_samples=3, logger="tensorboard"), out, **QUIET)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    logged = events.Tensors("answers/text_summary")
    assert [event.step for event in logged] == [0, 4]
    prompts = [prompt for prompt, _ in json_pairs(tmp_path / "copy.jsonl")[19::20][:3]]
    for event in logged:
        texts = event.tensor_proto.string_val[0].decode().split("\n\n---\n\n")
        assert len(texts) == 3
        for text, prompt in zip(texts, prompts):  # indented as code blocks for TensorBoard's Markdown
            assert "\n".join(line[4:] for line in text.split("\n")).startswith(prompt)


def json_pairs(path):
    return [(record["prompt"], record["response"]) for record in map(json.loads, path.read_text().splitlines())]


def test_prepared_data_is_taken_when_it_was_encoded_with_the_sources_tokenizer(text_run, tmp_path):
    from pgm.data import prepare_text

    config = tiny_config(init_from=str(text_run), max_steps=1)
    same, other = tmp_path / "same", tmp_path / "other"
    prepare_text(config.data, config.model.length, same, workers=1, log=lambda *a: None)  # the source's recipe
    prepare_text(config.data.replace(vocab_size=300), config.model.length, other, workers=1, log=lambda *a: None)
    train(config.with_overrides([f"data.prepared={same}"]), tmp_path / "on-same", **QUIET)
    assert not (tmp_path / "on-same" / "data").exists()  # read in place
    with pytest.raises(RunError, match="encoded with another tokenizer than that of train.init_from"):
        train(config.with_overrides([f"data.prepared={other}"]), tmp_path / "on-other", **QUIET)
