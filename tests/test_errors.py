"""Issue 32, class 10: one error type tells a user's mistake from a bug. What the package raises for
a mistake is a `pgm.PGMError`, which the command line prints as one line with exit code 2 and the
server answers with a 4xx; anything else is a bug, shown as one: a traceback, or an HTTP 500 with
the traceback logged."""

import ast
import importlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import pgm
from pgm import errors
from pgm.pipeline.text import TextPipeline

SOURCE = Path(pgm.__file__).parent
KINDS = [errors.ConfigError, errors.ArgumentError, errors.SamplingError, errors.DataError, errors.RunError,
         errors.CheckpointError, errors.PublishError, errors.MissingDependency, errors.ResourceError]
# What the package raises that is deliberately not a PGMError, and why.
NOT_MISTAKES = {
    ("pgm.data.packing", "IndexError"): "TokenRows[i] out of range: the sequence protocol (iteration stops on it)",
    ("pgm.serve", "RuntimeError"): "the server's thread died before it started: a bug, shown as one",
    ("pgm.serve.scheduler", "Busy"): "turned into HTTP 503 by the app",
    ("pgm.serve.app", "Refused"): "the app's own 4xx answer",
}


def raised_names():
    """(module, name of the class raised, line) of every `raise Name(...)` in the package."""
    for path in sorted(SOURCE.rglob("*.py")):
        module = ".".join(("pgm", *path.relative_to(SOURCE).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                yield module, node.exc.func.id, node.lineno


def test_every_error_the_package_raises_is_a_pgm_error_or_named_as_not_a_mistake():
    found, wrong = set(), []
    for module, name, line in raised_names():
        if not name[0].isupper():
            continue  # a function that builds the error: what it returns is checked where it is raised
        raised = getattr(importlib.import_module(module), name, None) or getattr(__builtins__, name, None)
        found.add(name)
        if (module, name) in NOT_MISTAKES:
            continue
        if not (isinstance(raised, type) and issubclass(raised, pgm.PGMError)):
            wrong.append(f"{module}:{line} raises {name}")
    assert not wrong, "\n".join(wrong)
    assert {"ConfigError", "SamplingError", "ArgumentError", "MissingDependency", "ResourceError"} <= found


def test_the_kinds_stay_what_callers_already_catch():
    for kind in KINDS:
        assert issubclass(kind, pgm.PGMError) and getattr(pgm, kind.__name__) is kind
    assert issubclass(errors.MissingDependency, ImportError) and issubclass(errors.ResourceError, OSError)
    assert all(issubclass(kind, ValueError) for kind in KINDS[:7])


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.__name__)
def test_a_mistake_of_any_kind_is_one_line_and_exit_code_2(text_run, pgm_main, monkeypatch, kind):
    def plan(self, request):
        raise kind("the thing asked for cannot be done")

    monkeypatch.setattr(TextPipeline, "plan", plan)
    code, out, err = pgm_main("sample", text_run)
    assert (code, err) == (2, "pgm sample: error: the thing asked for cannot be done\n")


@pytest.mark.parametrize("bug", [ValueError, OSError, ImportError, KeyError, RuntimeError])
def test_a_bug_is_not_dressed_as_a_mistake(text_run, pgm_main, monkeypatch, bug):
    def plan(self, request):
        raise bug("an internal invariant broke")

    monkeypatch.setattr(TextPipeline, "plan", plan)
    with pytest.raises(bug, match="an internal invariant broke"):
        pgm_main("sample", text_run)


def test_the_command_prints_a_bug_with_its_traceback_and_exit_code_1(text_run):
    script = ("import sys\nfrom pgm import cli\nfrom pgm.pipeline.text import TextPipeline\n"
              "def plan(self, request):\n    return {}['a missing key']\n"
              "TextPipeline.plan = plan\nsys.exit(cli.main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", script, "sample", str(text_run)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "KeyError: 'a missing key'" in done.stderr
    assert "pgm sample: error" not in done.stderr


def test_the_server_answers_a_mistake_with_a_4xx_and_a_bug_with_a_500_whose_traceback_is_logged(
        text_run, monkeypatch, caplog):
    from starlette.testclient import TestClient

    from pgm.serve.app import create_app

    pipe = pgm.load(text_run)
    with TestClient(create_app({"tiny": pipe}), raise_server_exceptions=False) as client:
        def post(body):
            return client.post("/generate", content=json.dumps(body), headers={"content-type": "application/json"})

        assert post({"num_samples": 1, "length": 8}).status_code == 200
        answer = post({"num_samples": 1, "length": 8, "temperature": -1})
        assert answer.status_code == 400 and "temperature" in answer.json()["error"]

        def plan(self, request):
            raise ValueError("an internal invariant broke")

        monkeypatch.setattr(TextPipeline, "plan", plan)
        with caplog.at_level(logging.ERROR, logger="pgm.serve"):
            answer = post({"num_samples": 1, "length": 8})
        assert answer.status_code == 500 and "an internal invariant broke" in answer.json()["error"]
        logged = [record for record in caplog.records if record.name == "pgm.serve"]
        assert logged and logged[-1].exc_info and logged[-1].exc_info[0] is ValueError

        def plan(self, request):
            raise pgm.SamplingError("steps 99 is more than the 7 positions to generate")

        monkeypatch.setattr(TextPipeline, "plan", plan)
        answer = post({"num_samples": 1, "length": 8})
        assert answer.status_code == 400 and answer.json()["error"].startswith("steps 99 is more than")


@pytest.mark.parametrize("make", [
    lambda tmp: ("train", "--preset", "text-tiny", "--out", tmp / "a-file", "train.max_steps=1"),
    lambda tmp: ("prepare", "--preset", "text-tiny", "--out", tmp / "a-file" / "data"),
    lambda tmp: ("bench", "sampling", "--out-dir", tmp / "a-file" / "bench", "--lengths", "8", "--steps", "2"),
    lambda tmp: ("fid-classifier", "--out", tmp / "a-file" / "classifier"),
], ids=["train", "prepare", "bench", "fid-classifier"])
def test_an_output_that_cannot_be_made_is_one_sentence_before_any_work(pgm_main, tmp_path, make):
    (tmp_path / "a-file").write_text("a file where a directory is asked for")
    code, out, err = pgm_main(*make(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "a-file is a file" in err, err
    assert out == ""  # refused before anything was trained, prepared or timed
