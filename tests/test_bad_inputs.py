"""Every bad input a new user tried, each answered by one sentence and exit code 2: never a
traceback, a silent default or an option silently ignored; and nothing half-made left on disk."""

import gzip
import json

import numpy as np
import pytest
import torch


def assert_one_sentence(result, *fragments):
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


TEXT_CASES = [
    (("sample", "--num-samples", "-1"), "num_samples must be a positive integer, got -1"),
    (("sample", "--num-samples", "0"), "num_samples must be a positive integer, got 0"),
    (("sample", "--steps", "0"), "steps must be a positive integer, got 0"),
    (("sample", "--infill", "It was {{x}} night"), "'{{x}}'"),
    (("sample", "--infill", "It was {{4} night"), "unmatched '{{'"),
    (("sample", "--infill", "It was {{-2}} night"), "'{{-2}}'"),
    (("sample", "--infill", "It was a night"), "has no gap"),
    (("sample", "--length", "8", "--steps", "100"), "steps 100 is more than the 7 positions to generate"),
    (("sample", "--length", "0"), "length must lie in [2, 32]"),
    (("sample", "--guidance", "2"), "guidance applies to image models"),
    (("sample", "--classes", "1"), "classes applies to image models"),
    (("sample", "--known", "left"), "known applies to image models"),
    (("sample", "--order", "sideways"), "order must be one of"),
    (("sample", "--sampler", "halton"), "a pgm model samples with uniform, binomial, reference"),
    (("sample", "--temperature", "-1"), "temperature must be non-negative"),
    (("sample", "--top-p", "0"), "top_p must lie in (0, 1]"),
    (("sample", "--out", "grid.png"), "--out writes an image grid"),
    (("sample", "--prompt", "the " * 40), "more than the model's 32 positions"),
    (("eval", "--rows", "-5"), "rows must be a non-negative integer"),
    (("eval", "--passes", "-1"), "passes must be a positive integer, got -1"),
    (("eval", "--batch-size", "0"), "batch_size must be a positive integer"),
    (("eval", "--guidance", "3"), "--guidance has no effect here"),
    (("eval", "--steps", "5"), "--steps has no effect here"),
    (("eval", "--fid"), "--fid and --inception evaluate image models"),
    (("eval", "--evaluator", "/no/such/run", "--num-samples", "0"), "num_samples must be a positive integer"),
]


@pytest.mark.parametrize("args,message", TEXT_CASES, ids=[" ".join(a) for a, _ in TEXT_CASES])
def test_bad_requests_to_a_text_run(text_run, pgm_main, args, message):
    assert_one_sentence(pgm_main(args[0], text_run, *args[1:]), message)


def test_eval_checks_its_sample_arguments_before_the_validation_pass(text_run, pgm_main):
    for args, message in [(("--evaluator", "/no/such/run"), "--evaluator /no/such/run does not exist"),
                          (("--evaluator", str(text_run), "--sample-batch-size", "0"),
                           "sample_batch_size must be a positive integer")]:
        result = pgm_main("eval", text_run, *args)
        assert_one_sentence(result, message)
        assert "validation" not in result[1]  # refused before the validation pass, not after it


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_that_is_not_there(text_run, pgm_main):
    assert_one_sentence(pgm_main("eval", text_run, "--device", "cuda"), "asks for a GPU")
    assert_one_sentence(pgm_main("sample", text_run, "--device", "cuda:0"), "asks for a GPU")
    assert_one_sentence(pgm_main("sample", text_run, "--device", "tpu"), "device 'tpu'")


IMAGE_CASES = [
    (("--prompt", "a shirt"), "prompt applies to text models"),
    (("--order", "confidence"), "order applies to text models"),
    (("--length", "10"), "length applies to text models"),
    (("--mark",), "mark applies to text models"),
    (("--classes", "11"), "unknown class '11'"),
    (("--classes", "dog"), "unknown class 'dog'"),
    (("--steps", "65"), "steps 65 is more than the 64 cells"),
    (("--guidance", "-1"), "guidance must be a non-negative number"),
    (("--images", "2"), "completed from the region given by known"),
    (("--known", "left", "--classes", "1"), "drop classes"),
    (("--known", "left", "--images", "100000"), "fewer than 100000"),
    (("--known", "left", "--images", "/no/such.png"), "cannot read the image /no/such.png"),
    (("--sampler", "uniform"), "an image model samples with halton, confidence"),
]


@pytest.mark.parametrize("args,message", IMAGE_CASES, ids=[" ".join(a) for a, _ in IMAGE_CASES])
def test_bad_requests_to_an_image_run(image_runs, pgm_main, args, message):
    assert_one_sentence(pgm_main("sample", image_runs / "pgm", *args), message)


def test_a_vq_run_is_not_sampled(image_runs, pgm_main):
    assert_one_sentence(pgm_main("sample", image_runs / "vq"), "VQ autoencoder")
    assert_one_sentence(pgm_main("eval", image_runs / "vq", "--guidance", "1"), "--guidance has no effect")


def test_a_config_file_that_is_not_an_object(tmp_path, pgm_main):
    (tmp_path / "list.json").write_text(json.dumps([{"model": {}}]))
    assert_one_sentence(pgm_main("train", "--preset", "text-tiny", "--config", tmp_path / "list.json", "--out",
                                 tmp_path / "run"), "must hold a JSON object", "not a list")
    (tmp_path / "section.json").write_text(json.dumps({"train": [1, 2]}))
    assert_one_sentence(pgm_main("train", "--preset", "text-tiny", "--config", tmp_path / "section.json", "--out",
                                 tmp_path / "run"), "'train' section must be an object")
    assert not (tmp_path / "run").exists()


def test_a_vocabulary_the_corpus_cannot_fill_is_refused_and_leaves_no_run(tmp_path, pgm_main):
    result = pgm_main("train", "--preset", "text-tiny", "data.vocab_size=100000", "--out", tmp_path / "run")
    assert_one_sentence(result, "fewer than data.vocab_size=100000", "set data.vocab_size=")
    assert not (tmp_path / "run").exists()


def test_a_failed_data_step_leaves_no_run_directory(tmp_path, pgm_main):
    assert_one_sentence(pgm_main("train", "--preset", "text-tiny", "data.source=/no/such/corpus", "--out",
                                 tmp_path / "run"), "no such data file or folder")
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    pgm_main("train", "--preset", "text-tiny", "data.source=/no/such/corpus", "--out", tmp_path / "kept")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes.txt"]


def test_the_missing_vq_hint_names_the_preset_that_trains_it(tmp_path, pgm_main, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = pgm_main("train", "--preset", "image-pgm-tiny")
    assert_one_sentence(result, "runs/vq-tiny", "pgm train --preset vq-tiny --out runs/vq-tiny")
    assert not (tmp_path / "runs" / "image-pgm-tiny").exists()
    result = pgm_main("train", "--preset", "image-pgm-tiny", "data.tokenizer=vq:elsewhere")
    assert_one_sentence(result, "pgm train --preset fmnist-vq --out elsewhere")


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fid_classifier_reports_the_images_it_used(tmp_path, pgm_main, monkeypatch):
    from pgm.data.image_sets import load_fashion_mnist
    from pgm.errors import DataError

    try:
        images, labels = load_fashion_mnist("test")
    except DataError as error:
        pytest.skip(str(error))
    for prefix, rows in (("train", slice(0, 300)), ("t10k", slice(300, 364))):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images[rows, 0])
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels[rows])
    monkeypatch.setenv("PGM_FASHION_MNIST", str(tmp_path))
    code, out, _ = pgm_main("fid-classifier", "--out", tmp_path / "classifier", "--epochs", "1")
    assert code == 0 and "on the 64 Fashion-MNIST test images (300 trained on)" in out
