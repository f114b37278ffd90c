"""`pgm bench` end to end on tiny shapes: the JSON is written, the table printed, and the rows say
what was measured (calls, steps, the ratios to the baseline)."""

import json

import pytest


def test_bench_sampling_writes_its_json_and_prints_its_table(tmp_path, pgm_main):
    code, out, _ = pgm_main("bench", "sampling", "--lengths", "16", "--steps", "4", "--batch-size", "2", "--hidden",
                            "32", "--heads", "2", "--pgm-blocks", "1", "1", "--baseline-blocks", "2", "--vocab", "64",
                            "--repeats", "1", "--warmup", "0", "--out-dir", tmp_path)
    assert code == 0
    report = json.loads((tmp_path / "sampling.json").read_text())
    rows = {row["model"]: row for row in report["results"]}
    assert sorted(rows) == ["ar", "mdlm", "mdlm-full", "pgm"]
    assert rows["pgm"]["forward_calls"] == 4 and rows["ar"]["steps"] == 15 and rows["ar"]["forward_calls"] == 15
    assert rows["mdlm"]["ratio_to_mdlm"] == 1 and rows["mdlm"]["work_ratio_to_mdlm"] == 1
    assert rows["pgm"]["work_ratio_to_mdlm"] > 1  # a PGM step costs less than an MDLM step
    assert all(row["tokens_per_s"] > 0 and row["batch"] == 2 for row in rows.values())
    lines = out.splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("device cpu"))  # after the progress lines
    assert lines[table + 1].split()[:4] == ["model", "params", "L", "steps"]
    assert [line.split()[0] for line in lines[table + 2:table + 6]] == ["pgm", "mdlm", "mdlm-full", "ar"]
    assert (tmp_path / "sampling.png").stat().st_size > 1000


@pytest.mark.slow
def test_bench_sampling_puts_compiled_rows_beside_the_eager_ones(tmp_path, pgm_main):
    code, out, err = pgm_main("bench", "sampling", "--models", "mdlm", "ar", "--compile", "eager", "default",
                              "--lengths", "16", "--steps", "4", "--batch-size", "2", "--hidden", "32", "--heads", "2",
                              "--baseline-blocks", "1", "--vocab", "64", "--repeats", "1", "--out-dir", tmp_path)
    assert code == 0, err
    rows = json.loads((tmp_path / "sampling.json").read_text())["results"]
    assert [(row["model"], row["compile"]) for row in rows] == [("mdlm", None), ("mdlm", "default"), ("ar", None)]
    eager, compiled, ar = rows
    assert compiled["ratio_to_mdlm"] == 1 and compiled["ratio_to_eager"] == pytest.approx(
        compiled["tokens_per_s"] / eager["tokens_per_s"])
    assert eager["ratio_to_eager"] is None and ar["ratio_to_mdlm"] == pytest.approx(
        ar["tokens_per_s"] / eager["tokens_per_s"])  # an eager row against the eager MDLM
    assert "default" in out and "x eager" in out
    code, _, err = pgm_main("bench", "sampling", "--compile", "default", "--warmup", "0", "--out-dir", tmp_path)
    assert code == 2 and "compiled rows need warmup >= 1" in err
    code, _, err = pgm_main("bench", "training", "--compile", "default", "--out-dir", tmp_path)
    assert code == 2 and "--compile applies to bench sampling" in err
    code, _, err = pgm_main("bench", "sampling", "--models", "ar", "--compile", "default", "--out-dir", tmp_path)
    assert code == 2 and "compile applies to the pgm, mdlm, mdlm-full rows, and none is asked for" in err
    code, _, err = pgm_main("bench", "sampling", "--models", "pgm", "ar", "--compile", "default", "--out-dir",
                            tmp_path)
    assert code == 2 and "the ar and pgm-cache rows run eagerly: with them, compile must include eager" in err


def test_bench_images_compares_the_presets_it_is_given(tmp_path, pgm_main):
    code, out, _ = pgm_main("bench", "images", "--presets", "image-pgm-tiny", "maskgit-tiny", "--steps", "4",
                            "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--out-dir", tmp_path)
    assert code == 0
    report = json.loads((tmp_path / "images.json").read_text())
    rows = report["results"]
    assert [(r["preset"], r["guidance"], r["batch"]) for r in rows] == [
        (preset, guidance, batch) for preset in ("image-pgm-tiny", "maskgit-tiny") for guidance in (0.0, 3.0)
        for batch in (2, 1)]
    assert all(r["forward_calls"] == 4 for r in rows)
    assert all(r["ratio_to_maskgit"] == 1 for r in rows if r["model"] == "maskgit")
    assert sum(line.startswith(("image-pgm-tiny", "maskgit-tiny")) for line in out.splitlines()) == 8


def test_bench_refuses_options_it_would_ignore(tmp_path, pgm_main):
    code, _, err = pgm_main("bench", "sampling", "--presets", "text-tiny", "--out-dir", tmp_path)
    assert code == 2 and "--presets chooses the models of bench training and bench images" in err
    code, _, err = pgm_main("bench", "training", "--sampler", "halton", "--out-dir", tmp_path)
    assert code == 2 and "--sampler applies to bench images" in err


def test_bench_training_times_forward_and_backward_against_the_mdlm(tmp_path, pgm_main):
    code, out, err = pgm_main("bench", "training", "--presets", "text-tiny", "mdlm-tiny", "--batch-size", "2",
                              "--lengths", "16", "--repeats", "2", "--warmup", "0", "--out-dir", tmp_path)
    assert code == 0, err
    report = json.loads((tmp_path / "training.json").read_text())
    assert report["warmup"] == 0 and report["steps"] == 2  # --warmup reaches training too
    pgm_row, grouped_row, mdlm_row = report["results"]
    assert [row["attention"] for row in report["results"]] == ["dense", "grouped", "dense"]
    assert report["baseline"] == "mdlm-tiny" and mdlm_row["ratio_to_baseline"] == 1.0
    assert pgm_row["batch"] == 2 and pgm_row["length"] == 16 and pgm_row["model"] == "pgm"
    assert 0 < pgm_row["forward_s"] < pgm_row["forward_backward_s"]
    assert pgm_row["forward_backward_seq_per_s"] == pytest.approx(2 / pgm_row["forward_backward_s"])
    assert pgm_row["ratio_to_baseline"] == pytest.approx(
        pgm_row["forward_backward_seq_per_s"] / mdlm_row["forward_backward_seq_per_s"])
    assert "fwd+bwd s" in out and "text-tiny" in out
    code, _, err = pgm_main("bench", "training", "--lengths", "16", "32", "--out-dir", tmp_path)
    assert code == 2 and "one --lengths value" in err
    code, _, err = pgm_main("bench", "sampling", "--attention", "dense", "--out-dir", tmp_path)
    assert code == 2 and "--attention applies to bench training" in err


def test_the_papers_training_shapes_have_its_parameter_counts():
    from pgm.bench import PAPER_SHAPES, training_config
    from pgm.models import build_model

    paper = {"pgm-owt-8-8": 203e6, "pgm-owt-6-6-1024": 268e6, "mdlm-owt": 170e6}  # Tables 1 and 2
    for name in PAPER_SHAPES:
        config = training_config(name, length=16)
        assert config.length == 16 and config.vocab_size == 50258
        assert build_model(config).num_parameters() == pytest.approx(paper[name], rel=0.005), name
