"""Issue 32's classes 1, 5, 6 and 8 on the command line and in Python: a number out of range, an
option that would do nothing, a bench or report argument, text that is not text. Each is refused
before any work, in one line naming what is wrong, with exit code 2."""

import pytest
import torch

import pgm
from pgm.pictures import image_format, save_grid


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    from pgm.presets import preset
    from pgm.train import train

    run = tmp_path_factory.mktemp("ar") / "ar"
    config = preset("ar-tiny").with_overrides(["train.max_steps=4", "train.progress=false"])
    train(config, run, log=lambda *a: None)
    return run


def refused(pgm_main, *args) -> str:
    code, out, err = pgm_main(*args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (args, code, err)
    return lines[0]


def test_numbers_out_of_range_and_text_that_is_not_text(text_run, pgm_main):
    cases = [
        (["--seed", str(2 ** 64)], f"seed must be an integer in [0, 2^64), got {2 ** 64}"),
        (["--seed", "-1"], "seed must be an integer in [0, 2^64), got -1"),
        (["--temperature", "inf"], "temperature must be a finite number, got inf"),
        (["--guidance", "nan"], "guidance"),
        (["--prompt", "ok \udcff\udcfe"], "prompt is not valid text: character 3 is not Unicode"),
    ]
    for extra, expected in cases:
        assert expected in refused(pgm_main, "sample", text_run, *extra)
    pipe = pgm.load(text_run)
    with pytest.raises(ValueError, match="item 2 of texts is not valid text: character 1"):
        pipe.score(["fine", "x\ud800"])
    with pytest.raises(ValueError, match="prompt is not valid text"):
        pipe.generate(prompt="a\udc80b")


def test_options_that_would_do_nothing_are_refused_or_said(text_run, ar_run, pgm_main, tmp_path):
    assert "holds an autoregressive model, whose validation is exact in one pass" in refused(
        pgm_main, "eval", ar_run, "--passes", "3")
    assert "--passes 0 skips the validation, and nothing else was asked" in refused(
        pgm_main, "eval", text_run, "--passes", "0")
    assert "rows=100000 is more than the" in refused(pgm_main, "eval", text_run, "--rows", "100000")
    code, out, err = pgm_main("eval", text_run, "--passes", "1", "--rows", "4")
    assert code == 0 and "nan" not in out and "one pass: no error estimate" in out
    code, out, err = pgm_main("eval", ar_run, "--rows", "4")  # exact without being asked for passes
    assert code == 0 and "exact likelihood" in out
    with pytest.raises(ValueError, match="an autoregressive model's scores are exact in one pass"):
        pgm.load(ar_run).score(["a text"], passes=8)
    assert "train.lr is set twice" in refused(pgm_main, "train", "--preset", "text-tiny", "--out", tmp_path / "twice",
                                              "train.lr=0.1", "lr=0.2")
    assert not (tmp_path / "twice").exists()


def test_the_harness_refuses_monte_carlo_samples_for_an_exact_model(ar_run):
    pytest.importorskip("lm_eval")
    from pgm.harness import HarnessModel

    with pytest.raises(ValueError, match="holds an autoregressive model, whose likelihoods are exact"):
        HarnessModel(str(ar_run), num_mc=4, progress=False)
    assert HarnessModel(str(ar_run), progress=False).settings["num_mc"] == 1


def test_bench_and_report_arguments_are_checked_before_any_work(text_run, pgm_main):
    tiny = ["--hidden", "32", "--heads", "2", "--vocab", "64", "--warmup", "0"]
    cases = [
        (["bench", "sampling", "--batch-size", "-1", *tiny], "--batch-size must be at least 1, got -1"),
        (["bench", "sampling", "--repeats", "0", *tiny], "--repeats must be at least 1, got 0"),
        (["bench", "sampling", "--lengths", "32", "--steps", "64", "--models", "pgm", *tiny],
         "64 steps is more than the 31 positions a PGM decodes in a row of length 32"),
        (["report", text_run, "--evaluator", "hf:gpt2", "--steps", "0"], "--steps must be at least 1, got 0"),
        (["report", text_run, "--evaluator", "hf:gpt2", "--num-samples", "-2"], "--num-samples must be at least 1"),
    ]
    for args, expected in cases:
        assert expected in refused(pgm_main, *args)


def test_an_image_file_is_written_in_the_format_its_name_says(tmp_path):
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    assert save_grid(images, tmp_path / "grid.jpg", columns=2).read_bytes()[:3] == b"\xff\xd8\xff"
    assert save_grid(images, tmp_path / "grid.png", columns=2).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"grid.xyz: an image file's name ends in its format, such as .png or .jpg"):
        image_format(tmp_path / "grid.xyz")


def test_weights_that_do_not_fit_their_configuration_are_named_with_the_first_mismatch(text_run, tmp_path, pgm_main):
    import json

    saved = pgm.load(text_run).save_pretrained(tmp_path / "saved")
    config = json.loads((saved / "config.json").read_text())
    config["model"]["cond_dim"] += 8
    (saved / "config.json").write_text(json.dumps(config))
    line = refused(pgm_main, "sample", saved)
    assert f"{saved / 'model.safetensors'} does not fit the configuration in {saved / 'config.json'}: " in line
    assert line.endswith("size mismatch for sigma_map.mlp.0.weight: copying a param with shape torch.Size([16, 256]) "
                         "from checkpoint, the shape in current model is torch.Size([24, 256]).")


def test_many_text_samples_print_as_they_go_in_bounded_memory(text_run, tmp_path):
    """Drawn all at once, 20,000 rows of 16 took 1.35 GB against 0.36 GB for 2,000; in chunks the
    peak does not grow with the count."""
    import subprocess
    import sys

    script = ("import resource, subprocess, sys\n"
              "with open(sys.argv[1], 'w') as out:\n"
              "    subprocess.run([sys.executable, '-m', 'pgm', 'sample', sys.argv[2], '--num-samples', sys.argv[3],\n"
              "                    '--length', '16'], stdout=out, stderr=subprocess.DEVNULL, check=True)\n"
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    peaks = {}
    for count in (2000, 20000):
        out = tmp_path / f"{count}.txt"
        done = subprocess.run([sys.executable, "-c", script, str(out), str(text_run), str(count)], capture_output=True,
                              text=True, timeout=300, check=True)
        peaks[count] = int(done.stdout) / 1024  # MB
        assert out.read_text().count("=== sample ") == count
    assert peaks[20000] - peaks[2000] < 30, peaks


def test_text_in_chunks_keeps_the_prompt_and_draws_each_chunk_anew(text_run, pgm_main, monkeypatch):
    from pgm.pipeline import base

    code, out, _ = pgm_main("sample", text_run, "--prompt", "The", "--num-samples", "2", "--length", "12", "--seed", "3")
    whole = [block.split("===\n", 1)[1].strip() for block in out.split("=== sample ")[1:]]
    monkeypatch.setattr(base, "SAMPLE_CHUNK", 2)
    code, out, _ = pgm_main("sample", text_run, "--prompt", "The", "--num-samples", "5", "--length", "12", "--seed", "3")
    texts = [block.split("===\n", 1)[1].strip() for block in out.split("=== sample ")[1:]]
    assert code == 0 and len(texts) == 5 and all(text.startswith("The") for text in texts)
    assert texts[:2] == whole  # the first chunk is the request of its size, with the request's seed
    assert texts[2:4] != texts[:2]  # the next with a seed of its own
    pipe = pgm.load(text_run)
    assert [len(part.outputs) for part in pipe.chunks(prompt=["A", "B"], num_samples=5, length=12)] == [2, 2, 1] * 2
    generated = pipe.generate(prompt=["A", "B"], num_samples=5, length=12, seed=3)
    assert [text[0] for text in generated] == ["A"] * 5 + ["B"] * 5  # the request's order: prompt by prompt
    assert pipe.generate(prompt="The", num_samples=5, length=12, seed=3) == texts  # Python draws as the CLI does


def test_images_in_chunks_come_back_in_the_request_order(image_runs, monkeypatch):
    from pgm.pipeline import base

    pipe = pgm.load(image_runs / "pgm")
    arguments = dict(classes=[0, 1, 2], num_samples=4, steps=4, seed=5)
    monkeypatch.setattr(base, "SAMPLE_CHUNK", 6)  # two copies of each of the three classes per chunk
    parts = list(pipe.chunks(**arguments))
    assert [part.labels for part in parts] == [[0, 0, 1, 1, 2, 2]] * 2
    first = pipe.chunks(**{**arguments, "num_samples": 2})  # one chunk: the request drawn as it always was
    assert torch.equal(parts[0].tokens, next(first).tokens)
    whole, generated = pipe.sample(**arguments), pipe.generate(**arguments)
    assert whole.labels == [0] * 4 + [1] * 4 + [2] * 4 and whole.settings["num_samples"] == 4
    order = [(0, 0), (0, 1), (1, 0), (1, 1)]  # (chunk, copy within it) of each class's four images
    for label in range(3):
        for copy, (chunk, row) in enumerate(order):
            expected = parts[chunk]
            assert torch.equal(whole.tokens[4 * label + copy], expected.tokens[2 * label + row])
            assert torch.equal(whole.images[4 * label + copy], expected.images[2 * label + row])
            assert generated[4 * label + copy].tobytes() == expected.outputs[2 * label + row].tobytes()
    assert whole.generated == sum(part.generated for part in parts)
