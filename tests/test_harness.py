"""Our models inside lm-evaluation-harness: local YAML tasks on local JSON files (the Hub is out of
reach), models that memorised a tiny text, the offline built-in tasks and `pgm harness`."""

import json
import math

import pytest
import torch

import pgm
from pgm.eval.likelihood import greedy_suffixes, noise_key, suffix_scores
from pgm.harness import BUILTIN_TASKS, HarnessModel, evaluate
from pgm.harness.tasks import CLOZE_BODY, LAMBADA_BODY, MIN_WORDS, write_builtin_tasks, write_task
from pgm.objectives import objective_for

SENTENCES = [["alpha", "beta", "gamma", "delta"], ["one", "two", "three", "four"], ["red", "green", "blue", "black"],
             ["north", "south", "east", "west"]]


@pytest.fixture(scope="session")
def memorised(tmp_path_factory):
    """A PGM, an MDLM and an AR model (the tiny presets, hidden size 64) trained on one short text,
    four sentences repeated in a fixed order (paragraphs of ten rounds), until they know it."""
    from pgm.presets import preset
    from pgm.train import train

    root = tmp_path_factory.mktemp("memorised")
    text = root / "text.txt"
    text.write_text("\n\n".join([" ".join(" ".join(words) + "." for words in SENTENCES * 10)] * 30))
    runs = {}
    for kind, name, steps in (("pgm", "text-tiny", 600), ("mdlm", "mdlm-tiny", 600), ("ar", "ar-tiny", 200)):
        overrides = [f"data.source={text}", "data.vocab_size=314", "model.hidden_size=64", "lr=0.005",
                     f"max_steps={steps}", f"eval_every={steps}", f"save_every={steps}"]
        train(preset(name).with_overrides(overrides), root / kind, log=lambda *a: None)
        runs[kind] = root / kind
    return runs


def context(index: int, cut: int) -> str:
    """The sentence before sentence `index` (in the text's cycle), then its first `cut` words."""
    return " ".join(SENTENCES[index - 1]) + ". " + " ".join(SENTENCES[index][:cut])


def cloze_records():
    """Each sentence cut after 1, 2 or 3 words; the choices are the four sentences' rests."""
    return [{"context": context(index, cut), "choices": [" ".join(other[cut:]) for other in SENTENCES],
             "label": index} for cut in (1, 2, 3) for index in range(len(SENTENCES))]


def lambada_records():
    return [{"context": context(index, 3), "target": " " + SENTENCES[index][3]} for index in range(len(SENTENCES))]


class Request:
    def __init__(self, *args):
        self.args = args


@pytest.mark.parametrize("kind", ["pgm", "mdlm", "ar"])
def test_a_model_that_memorised_a_text_picks_its_continuations(memorised, kind, tmp_path):
    tasks = tmp_path / "tasks"
    write_task(tasks, "memory_cloze", cloze_records(), CLOZE_BODY)
    write_task(tasks, "memory_lambada", lambada_records(), LAMBADA_BODY)
    results, path = evaluate(memorised[kind], ["memory_cloze", "memory_lambada"], num_mc=None if kind == "ar" else 16,
                             include=[str(tasks)], output=tmp_path / "results.json", progress=False)
    assert results["results"]["memory_cloze"]["acc,none"] == 1.0
    # Greedy: the last word predicted at once. The harness's accuracy is our greedy check over its
    # requests; the MDLM and the AR model know the words, while the fixture's PGM, asked with the
    # whole future absent, gives the document separator 0.3-0.5 of its mass after some of these
    # contexts (0.5 of the four after 1000 steps instead of 600, on one machine), so its
    # accuracy is only compared.
    pipe = pgm.load(memorised[kind])
    tokenizer = pipe.tokenizer
    items = []
    for record in lambada_records():
        context_ids, whole_ids = tokenizer.encode_batch([record["context"], record["context"] + record["target"]])
        items.append(([tokenizer.bos_id, *whole_ids], 1 + len(context_ids)))
    greedy = greedy_suffixes(pipe.model, objective_for(pipe.model), items)
    assert results["results"]["memory_lambada"]["acc,none"] == sum(greedy) / len(greedy)
    if kind != "pgm":
        assert sum(greedy) >= 3
    written = json.loads(path.read_text())
    assert written["results"]["memory_cloze"]["acc,none"] == 1.0
    assert written["pgm"]["num_mc"] == (1 if kind == "ar" else 16) and written["pgm"]["weights"] == "ema"


def test_the_harness_finds_the_model_by_its_name(memorised, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = tmp_path / "tasks"
    write_task(tasks, "memory_cloze", cloze_records(), CLOZE_BODY)
    results = lm_eval.simple_evaluate(model="pgm", model_args=f"path={memorised['mdlm']},num_mc=8,progress=False",
                                      tasks=["memory_cloze"],
                                      task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                      batch_size=16, bootstrap_iters=0)
    assert results["results"]["memory_cloze"]["acc,none"] == 1.0


@pytest.mark.parametrize("kind", ["pgm", "mdlm"])
def test_loglikelihood_is_the_conditional_elbo_of_the_continuation(memorised, kind):
    model = HarnessModel(memorised[kind], num_mc=32, progress=False)
    pipe = model.pipe
    bos = pipe.tokenizer.bos_id
    prompt, continuation = context(1, 2), " three four"
    [(value, greedy)] = model.loglikelihood([Request(prompt + " ", continuation.lstrip())])  # the space moves over
    context_ids = pipe.tokenizer.encode_batch([prompt])[0]
    whole = pipe.tokenizer.encode_batch([prompt + continuation])[0]
    item = ([bos, *whole], 1 + len(context_ids))
    [score] = suffix_scores(pipe.model, objective_for(pipe.model), [item], passes=32,
                            noise_keys=[noise_key(item[0][:item[1]])])
    # Whether the memorised model is greedy here depends on the machine its fixture trained on.
    assert value == pytest.approx(-score.nll) and greedy == greedy_suffixes(pipe.model, objective_for(pipe.model),
                                                                             [item])[0]
    # The authors' whole-sequence scoring adds the context's own cost.
    authors = HarnessModel(pipeline=pipe, num_mc=32, method="whole-sequence", progress=False)
    [(whole_value, whole_greedy)] = authors.loglikelihood([Request(prompt, continuation)])
    [whole_score] = suffix_scores(pipe.model, objective_for(pipe.model), [(item[0], 1)], passes=32,
                                  noise_keys=[noise_key(item[0][:item[1]])], unknown_future=False)
    assert whole_value == pytest.approx(-whole_score.nll) and whole_value < value and whole_greedy == greedy


def test_rolling_loglikelihood_scores_every_token_once_in_windows(memorised):
    model = HarnessModel(memorised["ar"], progress=False)
    pipe = model.pipe
    text = " ".join(" ".join(words) + "." for words in SENTENCES * 4)
    ids = pipe.tokenizer.encode_batch([text])[0]
    length = pipe.config.length
    assert len(ids) > 2 * length  # three windows at least
    [value] = model.loglikelihood_rolling([Request(text)])
    # By hand: exact AR log-probabilities over windows of `width` predicted tokens, each after the BOS
    # and what precedes it up to width + 1 tokens (one token, except in the last window).
    expected, width = 0.0, length - 2
    with torch.no_grad():
        for start in range(0, len(ids), width):
            end = min(start + width, len(ids))
            context = ids[max(0, end - width - 1):start]
            window = [pipe.tokenizer.bos_id, *context, *ids[start:end]]
            logits = pipe.model(torch.tensor([window[:-1]]))[0]
            logits[:, pipe.config.mask_token_id] = float("-inf")
            logprobs = logits.log_softmax(-1).gather(1, torch.tensor(window[1:])[:, None])[:, 0]
            expected += float(logprobs[len(context):].sum())
    assert value == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["pgm", "mdlm", "ar"])
def test_generate_until_continues_the_context_and_stops(memorised, kind):
    model = HarnessModel(memorised[kind], progress=False)
    outputs = model.generate_until([Request(context(0, 2), {"until": ["."], "max_gen_toks": 6}),
                                    Request(context(2, 2), {"until": [" black"], "max_gen_toks": 6}),
                                    Request(context(1, 1), {"max_gen_toks": 2})])
    if kind == "mdlm":
        # Its rows run to the model's length, the unknown rest masked: outside what it was trained
        # on, and its words there depend on the machine the fixture trained on (" west" for the
        # first on one). What must hold: the stop strings cut, the token budgets bound.
        prompt, generated = model.pipe.tokenizer.encode_batch([context(1, 1), context(1, 1) + outputs[2]])
        assert "." not in outputs[0] and " black" not in outputs[1] and len(generated) == len(prompt) + 2
        return
    assert outputs[0] == " gamma delta"  # greedy, cut before the stop string
    assert outputs[1] == " blue"
    assert outputs[2] == " two three"  # two tokens: the words are tokens of this BPE


def test_the_builtin_tasks_are_lambada_shaped_and_come_from_the_validation_split(tmp_path):
    write_builtin_tasks(tmp_path)
    lambada = [json.loads(line) for line in (tmp_path / "pgm_lambada.jsonl").read_text().splitlines()]
    cloze = [json.loads(line) for line in (tmp_path / "pgm_cloze.jsonl").read_text().splitlines()]
    assert len(lambada) >= 500 and len(cloze) == len(lambada)
    for example, question in zip(lambada, cloze):
        word = example["target"]
        assert word.startswith(" ") and word[1:].isalpha() and len(word) >= 4
        assert not example["context"].endswith(" ") and len(example["context"].split()) + 1 >= MIN_WORDS
        assert question["choices"][question["label"]] == word[1:] and len(set(question["choices"])) == 4
    from pgm.data import DataConfig
    from pgm.data.corpus import builtin_documents, split_documents

    data = DataConfig()  # the split computed here, not through the code under test
    train_docs, val_docs = split_documents(builtin_documents(), chunk_chars=data.chunk_chars, val_every=data.val_every,
                                           val_last=data.val_last)
    validation, training = "\n\n".join(val_docs), "\n\n".join(train_docs)
    sample = lambada[::50]
    assert all(example["context"][:60] in validation for example in sample)
    assert not any(example["context"] + example["target"] in training for example in sample)


def test_pgm_harness_runs_the_builtin_tasks_and_writes_the_results(text_run, pgm_main):
    code, out, err = pgm_main("harness", text_run, "--tasks", *BUILTIN_TASKS, "--limit", "3", "--num-mc", "2")
    assert code == 0, err
    path = text_run / "harness" / "pgm_lambada+pgm_cloze-conditional-mc2-limit3.json"
    assert f"wrote {path}" in out and "pgm_lambada" in out and "perplexity" in out
    results = json.loads(path.read_text())
    assert set(results["results"]) == set(BUILTIN_TASKS)
    assert results["pgm"]["method"] == "conditional" and results["pgm"]["num_mc"] == 2


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "knows no task no_such_task"),
    (["--tasks", "pgm_cloze", "--num-mc", "0"], "num_mc must be a positive integer"),
    (["--tasks", "pgm_cloze", "--limit", "0"], "limit must be a positive integer"),
    (["--tasks", "pgm_cloze", "--include", "/no/such/folder"], "no such folder"),
    (["--tasks", "pgm_cloze", "--bootstrap-iters", "-1"], "bootstrap_iters must be a non-negative integer"),
    (["--tasks", "pgm_cloze", "--method", "suffix"], "method must be one of conditional, whole-sequence"),
])
def test_bad_harness_requests_get_one_sentence(text_run, pgm_main, args, message):
    code, _, err = pgm_main("harness", text_run, *args)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_the_harness_model_refuses_what_it_cannot_do(text_run, memorised):
    with pytest.raises(ValueError, match="not max_batch_size"):
        HarnessModel(text_run, max_batch_size=4)
    with pytest.raises(ValueError, match="method must be one of"):
        HarnessModel(text_run, method="suffix")
    with pytest.raises(ValueError, match="order must be one of"):
        HarnessModel(text_run, order="backwards")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        HarnessModel(text_run, steps=0)
    model = HarnessModel(pipeline=pgm.load(memorised["ar"]), progress=False)
    too_long = " ".join(["one two three four."] * 40)
    with pytest.raises(ValueError, match="does not fit the model's"):
        model.loglikelihood([Request("one", too_long)])
    with pytest.raises(ValueError, match="not top_k"):
        model.generate_until([Request("one", {"top_k": 5})])


def test_the_authors_text_checkpoints_load_into_the_harness(tmp_path):
    from test_official import hyper_config, tiny_pgm_config, write_checkpoint

    from pgm.data.tokenizers import find_gpt2_file

    gpt2 = find_gpt2_file()
    if gpt2 is None:
        pytest.skip("no offline copy of gpt2.tiktoken (pip install --no-deps openai-whisper)")
    torch.manual_seed(0)
    model = pgm.PartitionTransformer(tiny_pgm_config(vocab_size=50258, length=32))
    write_checkpoint(tmp_path / "pgm.ckpt", model, hyper_config({"length": 32}))
    adapter = HarnessModel(tmp_path / "pgm.ckpt", gpt2_file=gpt2, num_mc=64, progress=False)
    [(value, _)] = adapter.loglikelihood([Request("The old man", " and the sea")])
    assert adapter.settings["weights"] == "ema" and adapter.pipe.config.vocab_size == 50258
    # A fresh output layer predicts uniformly over the 50,257 ids that are not the mask: each of the
    # continuation's tokens costs (1 - eps) log(50257) in expectation.
    [(ids, first)] = adapter.items([("The old man", " and the sea")])
    assert ids[:first] == [50256, *adapter.pipe.tokenizer.encode_batch(["The old man"])[0]]
    assert value == pytest.approx(-(len(ids) - first) * (1 - 1e-3) * math.log(50257), rel=0.15)
