"""`pgm.load(...)`: the one way in, for text and images, and what it promises: the same tokens as
the samplers called by hand, streams that add up to the samples, scores against closed forms,
and pretrained directories that keep their tokenizer."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_mdlm

import pgm
from pgm.data.tokenizers import train_bpe
from pgm.generation import known_from_text
from pgm.models import CausalConfig, CausalTransformer
from pgm.pipeline import TextPipeline
from pgm.sampling import sample_pgm


@pytest.fixture(scope="module")
def pipe(text_run):
    return pgm.load(text_run)


def test_generate_is_the_sampler_with_the_known_tokens_the_request_describes(pipe):
    texts = pipe.generate(prompt=["It was", "The old man said"], num_samples=2, length=16, steps=5, seed=7)
    assert len(texts) == 4
    assert texts[0].startswith("It was") and texts[1].startswith("It was") and texts[2].startswith("The old man")
    known, mask = known_from_text(pipe.tokenizer, length=16, max_length=pipe.config.length,
                                  prompts=["It was", "The old man said"], copies=2)
    by_hand = sample_pgm(pipe.model, known_tokens=known, known_mask=mask, steps=5,
                         generator=torch.Generator().manual_seed(7))
    samples = pipe.sample(prompt=["It was", "The old man said"], num_samples=2, length=16, steps=5, seed=7)
    assert torch.equal(samples.tokens, by_hand)
    assert samples.outputs == texts
    assert samples.generated == int((~mask).sum()) and samples.steps == 5
    assert pipe.generate(seed=7, steps=4) != pipe.generate(seed=8, steps=4)


def test_infill_keeps_the_text_around_the_gaps(pipe):
    samples = pipe.sample(infill="the man {{4}} and the {{3}}", mark=True, num_samples=3, steps=7)
    assert samples.tokens.shape[1] == int(samples.known[0].sum()) + 7 and samples.generated == 3 * 7
    for text in samples.outputs:
        assert text.startswith("the man [[") and "]] and the [[" in text and text.endswith("]]")


@pytest.mark.parametrize("request_", [
    dict(infill="a {{5}} b {{6}}", num_samples=2, steps=4, seed=3),
    dict(prompt=["a", "the old man said that"], length=16, steps=4, seed=3),  # rows of different widths
    dict(prompt="the", length=16, steps=4, order="confidence"),
], ids=["infill", "ragged", "confidence"])
def test_stream_commits_every_unknown_position_once_and_ends_with_the_samples(pipe, request_):
    events = list(pipe.stream(**request_))
    assert [e.step for e in events] == [0, 1, 2, 3, 4] and events[-1].done and not any(e.done for e in events[:-1])
    final = events[-1].samples
    assert final.outputs == pipe.generate(**request_)
    for row in range(len(final.outputs)):
        committed = [p for e in events[:-1] for p in e.positions[row]]
        unknown = (~final.known[row]).nonzero()[:, 0].tolist()
        assert sorted(committed) == unknown  # each unknown position exactly once
        for event in events[:-1]:
            for position, token, piece in zip(event.positions[row], event.tokens[row], event.pieces[row]):
                assert final.tokens[row, position] == token and piece == pipe.tokenizer.decode([token])
    if "infill" in request_:
        assert [len(e.positions[0]) for e in events[:-1]] == [2, 3, 3, 3]  # 11 positions over 4 steps


def test_a_stream_can_be_abandoned_after_any_step(pipe):
    stream = pipe.stream(steps=8)
    first = next(stream)
    assert first.step == 0 and not first.done
    stream.close()  # stops the sampling loop; nothing is left running
    with pytest.raises(StopIteration):
        next(stream)


@pytest.mark.parametrize("kind", ["mdlm", "ar"])
def test_mdlm_and_ar_pipelines_generate_and_stream(kind, tmp_path):
    text = "the cat sat on the mat. " * 40
    tokenizer = train_bpe([text], 300)
    if kind == "mdlm":
        model = tiny_mdlm(vocab_size=tokenizer.model_vocab_size, length=20)
    else:
        torch.manual_seed(0)
        model = CausalTransformer(CausalConfig(vocab_size=tokenizer.model_vocab_size, length=20, hidden_size=32,
                                               num_heads=2, blocks=2, cond_dim=16, dropout=0.0)).eval()
    model.save_pretrained(tmp_path / kind, tokenizer)
    loaded = pgm.load(tmp_path / kind)
    steps = {} if kind == "ar" else {"steps": 6}
    events = list(loaded.stream(prompt="the cat", num_samples=2, **steps))
    final = events[-1].samples
    unknown = (~final.known[0]).nonzero()[:, 0].tolist()
    assert sorted(p for e in events[:-1] for p in e.positions[0]) == unknown
    assert final.outputs == loaded.generate(prompt="the cat", num_samples=2, **steps)
    assert all(text.startswith("the cat") for text in final.outputs)


def uniform_pipeline(kind: str) -> TextPipeline:
    """A fresh model (its output layer is zero, so every prediction is uniform over the V - 1 non-mask
    ids) with a byte-level BPE."""
    tokenizer = train_bpe(["a b c d e f g h i j k l m n o p"], 270)
    vocab = tokenizer.model_vocab_size
    torch.manual_seed(0)
    if kind == "pgm":
        model = pgm.PartitionTransformer(pgm.PartitionConfig(vocab_size=vocab, length=40, hidden_size=16,
                                                             num_heads=2, encoder_blocks=1, decoder_blocks=1,
                                                             cond_dim=8, dropout=0.0))
    else:
        model = CausalTransformer(CausalConfig(vocab_size=vocab, length=40, hidden_size=16, num_heads=2, blocks=1,
                                               cond_dim=8, dropout=0.0))
    return TextPipeline(model.eval(), tokenizer, torch.device("cpu"))


def test_scores_of_a_uniform_model_are_the_closed_forms():
    texts = ["a b c", "p o n m l k j", "g"]
    ar = uniform_pipeline("ar")
    vocab = ar.config.vocab_size
    for text, score in zip(texts, ar.score(texts)):  # exact: every token costs log(V - 1)
        tokens = len(ar.tokenizer.encode_batch([text])[0])
        assert score.tokens == tokens and score.stderr == 0
        assert score.nll == pytest.approx(tokens * math.log(vocab - 1), rel=1e-5)
    diffusion = uniform_pipeline("pgm")
    eps = 1e-3
    for text, score in zip(texts, diffusion.score(texts, passes=64, seed=1)):
        # E[ELBO] = (1 - eps) log(V - 1) per token (the group-1 share 1 - alpha_t times the weight 1/t).
        expected = score.tokens * (1 - eps) * math.log(vocab - 1)
        assert abs(score.nll - expected) < 4 * score.stderr + 1e-3 * expected, (score, expected)
    again = diffusion.score(texts, passes=64, seed=1)
    assert [s.nll for s in again] == [s.nll for s in diffusion.score(texts, passes=64, seed=1)]


def test_save_pretrained_keeps_the_tokenizer_and_writes_a_model_card(pipe, tmp_path):
    model = pgm.from_pretrained(pipe.run)
    model.save_pretrained(tmp_path / "saved")
    files = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "tokenizer"]
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "| kind | pgm |" in card and "tokens seen" in card and "ELBO nats/token" in card
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["card"]["tokens_seen"] == 20 * 8 * 32
    reloaded = pgm.load(tmp_path / "saved")
    assert reloaded.generate(seed=2, steps=6, num_samples=2) == pipe.generate(seed=2, steps=6, num_samples=2)
    reloaded.model.save_pretrained(tmp_path / "again")  # a second generation keeps both
    assert (tmp_path / "again" / "tokenizer" / "tokenizer.json").is_file()
    assert (tmp_path / "again" / "README.md").read_text() == card


def test_a_pretrained_directory_has_no_validation_data(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="not a training run"):
        pgm.load(tmp_path / "saved").validation()


def test_validation_of_the_pipeline_is_the_runs_validation_elbo(pipe):
    result = pipe.validation(passes=2, rows=8, seed=0)
    assert result.passes == 2 and result.tokens == 8 * 31
    assert pipe.validation(passes=2, rows=8, seed=0).nll == result.nll


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def test_image_pipeline_generates_pictures_per_class_and_completes_known_regions(image_runs):
    from PIL import Image

    pipe = pgm.load(image_runs / "pgm")
    assert pipe.class_names[7] == "Sneaker"
    samples = pipe.sample(classes=["sneaker", 3, "none"], num_samples=2, guidance=2, steps=8)
    assert samples.labels == [7, 7, 3, 3, 10, 10]
    assert all(isinstance(p, Image.Image) and p.size == (32, 32) for p in samples.outputs)
    assert samples.tokens.shape == (6, 64) and int(samples.tokens.max()) < pipe.tokenizer.codebook_size
    completed = pipe.sample(known="left", images=3, steps=4)
    val_codes = pipe.data.val[[0, 1, 2]][0][:, 1:]
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    left = left.reshape(-1)
    assert torch.equal(completed.tokens[:, left], val_codes[:, left])
    assert completed.labels == pipe.data.val.labels_of([0, 1, 2]).tolist()
    assert completed.originals.shape == (3, 1, 32, 32)


def test_image_stream_builds_up_the_code_grid(image_runs):
    pipe = pgm.load(image_runs / "maskgit")
    events = list(pipe.stream(classes=[1], steps=4, seed=5))
    assert [e.step for e in events] == [0, 1, 2, 3, 4]
    unknown = [int((e.codes == -1).sum()) for e in events[:-1]]
    assert unknown == sorted(unknown, reverse=True) and unknown[-1] == 0
    assert torch.equal(events[-2].codes.reshape(1, -1), events[-1].samples.tokens)


def test_own_images_are_encoded_and_completed(image_runs, tmp_path):
    from PIL import Image

    pipe = pgm.load(image_runs / "pgm")
    picture = Image.fromarray(np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1)))
    picture.save(tmp_path / "ramp.png")
    from_file = pipe.sample(known="top", images=[str(tmp_path / "ramp.png")], classes=["bag"], steps=4)
    from_array = pipe.sample(known="top", images=[np.asarray(picture)[None]], classes=["bag"], steps=4)
    assert torch.equal(from_file.tokens, from_array.tokens) and from_file.labels == [8]
    with pytest.raises(ValueError, match="one class for all"):
        pipe.generate(known="top", images=[picture, picture, picture], classes=[1, 2])


def test_a_torn_metrics_line_does_not_stop_a_run_from_loading(text_run, tmp_path):
    import shutil

    run = tmp_path / "torn"
    shutil.copytree(text_run, run)
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 21, "lo')  # a process killed in the middle of a write
    assert pgm.load(run).model.origin.card["validation"]["step"] == 20


def test_load_refuses_what_does_not_apply(pipe, image_runs):
    with pytest.raises(ValueError, match="vq applies to image models"):
        pgm.load(pipe.run, vq=image_runs / "vq")
    with pytest.raises(ValueError, match="vq applies to image models"):
        pgm.load(image_runs / "vq", vq=image_runs / "vq")
    with pytest.raises(ValueError, match="gpt2_file is for checkpoints"):
        pgm.load(pipe.run, gpt2_file="gpt2.tiktoken")
    image = pgm.load(image_runs / "pgm")
    for arguments, message in ((dict(classes=[]), "classes is empty"),
                               (dict(known="top", images=[]), "images is empty"),
                               (dict(classes=[True]), "a class is a number or a name")):
        with pytest.raises(ValueError, match=message):
            image.generate(**arguments)
    assert image.sample(classes=np.int64(3), steps=4).labels == [3]


def test_a_vq_pipeline_saves_the_pixel_tokenizer_it_reads(image_runs, tmp_path):
    vq = pgm.load(image_runs / "vq")
    vq.save_pretrained(tmp_path / "vq")
    assert json.loads((tmp_path / "vq" / "tokenizer" / "tokenizer_config.json").read_text())["type"] == "pixels"
    image = pgm.load(image_runs / "pgm")
    image.save_pretrained(tmp_path / "pgm")  # its VQ goes into tokenizer/, without the pixel tokenizer
    assert not (tmp_path / "pgm" / "tokenizer" / "tokenizer").exists()
    again = pgm.load(tmp_path / "pgm")
    assert again.class_names == image.class_names
    assert torch.equal(again.sample(classes=[4], steps=4).tokens, image.sample(classes=[4], steps=4).tokens)
