"""Multi-round SDTT (`pgm distill`): the teacher's targets against a hand computation of its
ancestral steps, the divergences at their fixed point, the step times and rounds, exact resume
across a round boundary, and that distilling actually pulls a student towards its teacher."""

import copy
import json
import math
import shutil

import pytest
import torch
from conftest import tiny_mdlm, tiny_pgm
from safetensors.torch import load_file

from pgm.distill import ROUNDS_DIR, Distiller, distill, distillation_config, hidden_positions, teacher_targets
from pgm.objectives.distill import DIVERGENCES, divergence, draw_distill_noise, teacher_times
from pgm.objectives.schedules import LogLinearSchedule
from pgm.presets import distill_preset
from pgm.runs import read_run_config
from pgm.train import Distributed, train
from pgm.train_config import DistillConfig

EPS = 1e-3  # the log-linear schedule's


def alpha(t: float) -> float:
    return 1 - (1 - EPS) * t


def reference_log_probs(model, row: torch.Tensor, hidden: list[int], t: float) -> torch.Tensor:
    """Float64 log-probabilities [L, V] of one row whose `hidden` positions are unknown, from the
    full-length training view (PGM: groups = hidden; MDLM: mask tokens), the mask id removed."""
    config = model.config
    length = row.numel()
    cond = None
    if getattr(config, "time_conditioning", False):
        cond = torch.tensor([-math.log(alpha(t))])
    if config.kind == "pgm":
        groups = torch.zeros(1, length, dtype=torch.bool)
        groups[0, hidden] = True
        tokens = row.clone()
        tokens[hidden] = 0  # never read: a hidden token's logits come from the other group
        logits = model(tokens[None], groups, cond)[0]
    else:
        tokens = row.clone()
        tokens[hidden] = config.mask_token_id
        logits = model(tokens[None], cond)[0]
    logits = logits.double()
    logits[:, config.mask_token_id] = -math.inf
    return logits.log_softmax(-1)


def hand_targets(model, tokens, hidden, noise, dt):
    """The targets of `teacher_targets`, one row and one step at a time in float64."""
    targets = {}
    steps = noise.reveal.shape[1]
    for b in range(tokens.shape[0]):
        row = tokens[b].clone()
        still = [p for p in range(tokens.shape[1]) if hidden[b, p]]
        times = [max(float(noise.t[b]) - k * dt, 0.0) for k in range(steps + 1)]
        for k in range(steps):
            t, s = times[k], times[k + 1]
            p = 1.0 if s == 0 else (alpha(s) - alpha(t)) / (1 - alpha(t))
            if not still:
                break
            log_probs = reference_log_probs(model, row, still, t)
            revealed = [q for q in still if float(noise.reveal[b, k, q]) < p]
            for q in (still if k == steps - 1 else revealed):
                targets[b, q] = log_probs[q]
            for q in revealed:  # the draw: the first id whose cumulative probability exceeds u
                cdf = log_probs[q].exp().cumsum(0)
                row[q] = int((cdf > float(noise.draw[b, q]) * cdf[-1]).nonzero()[0])
            still = [q for q in still if q not in revealed]
    order = sorted(targets)  # row by row, positions in order: the order of `hidden`
    return torch.stack([targets[key] for key in order])


@pytest.mark.parametrize("kind", ["pgm", "mdlm", "mdlm-time-conditioned"])
@pytest.mark.parametrize("steps", [2, 3])
def test_teacher_targets_are_the_ancestral_steps_computed_by_hand(kind, steps):
    model = (tiny_pgm() if kind == "pgm" else tiny_mdlm(time_conditioning=kind != "mdlm"))
    batch, length = 4, model.config.length
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, model.config.vocab_size - 1, (batch, length), generator=generator)
    noise = draw_distill_noise(batch, length, steps, generator=generator)
    noise.t = torch.tensor([0.9, 0.55, 0.3, 0.12])  # the last row reaches time 0 within its steps
    hidden = noise.hide < (1 - torch.tensor([alpha(float(t)) for t in noise.t]))[:, None]
    hidden[:, 0] = False
    dt = 0.05
    got = teacher_targets(model, tokens, hidden, noise, dt)
    expected = hand_targets(model, tokens, hidden, noise, dt)
    assert got.shape == (int(hidden.sum()), model.config.vocab_size)
    finite = torch.isfinite(expected)
    assert not finite[:, model.config.mask_token_id].any()
    assert torch.allclose(got[finite].double(), expected[finite], atol=2e-5)
    assert (got[:, model.config.mask_token_id] < -1e29).all()
    # The targets differ from a single prediction at x_t: later steps see the teacher's own draws.
    single = teacher_targets(model, tokens, hidden, draw_distill_noise(batch, length, 1, generator=generator), dt)
    assert not torch.allclose(single, got, atol=1e-3)


def test_teacher_reveal_probabilities_add_up_to_mdlm_over_the_whole_span():
    schedule = LogLinearSchedule()
    t = torch.tensor([0.8, 0.4, 0.05])
    times = teacher_times(t, 0.1, 3)
    kept = torch.ones(3)
    for k in range(3):
        kept = kept * (1 - schedule.reveal_probability(times[:, k], times[:, k + 1]))
    # Still hidden after the steps = (1 - alpha_end) / (1 - alpha_t), 0 where the span reaches 0.
    expected = torch.tensor([(1 - alpha(0.5)) / (1 - alpha(0.8)), (1 - alpha(0.1)) / (1 - alpha(0.4)), 0.0])
    assert torch.allclose(kept, expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["pgm", "mdlm", "mdlm-time-conditioned"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_a_student_that_is_its_teacher_taking_one_step_has_zero_divergence_and_gradient(kind, name):
    teacher = tiny_pgm() if kind == "pgm" else tiny_mdlm(time_conditioning=kind != "mdlm")
    student = copy.deepcopy(teacher).train()
    from pgm.distill import StudentView, divergence_sum

    batch, length = 6, teacher.config.length
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, teacher.config.vocab_size - 1, (batch, length), generator=generator)
    for steps, zero in ((1, True), (2, False)):
        noise = draw_distill_noise(batch, length, steps, generator=generator)
        student.zero_grad()
        total, count = divergence_sum(StudentView(student), teacher, tokens, noise, 0.2, name, LogLinearSchedule())
        hidden = noise.hide < (1 - torch.tensor([alpha(float(t)) for t in noise.t]))[:, None]
        assert count == int(hidden.sum()) > 0
        loss = total / count
        loss.backward()
        loss = loss.detach()
        worst_gradient = max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None)
        if zero:
            assert abs(float(loss)) < 1e-6, float(loss)
            # The total variation's gradient is a sign, which float rounding (the teacher runs without
            # autograd, in slightly different kernels) makes +-1 at the fixed point: only the smooth
            # divergences have a vanishing gradient there.
            assert name == "tv" or worst_gradient < 1e-6, worst_gradient
        else:  # two teacher steps are not one: the same student is now off its target
            assert float(loss) > 1e-4 and worst_gradient > 1e-5


def test_divergences_against_their_closed_forms():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    q = torch.tensor([[0.25, 0.25, 0.5, 0.0]])
    suppressed = -1e30
    student = torch.where(p > 0, p.log(), suppressed)
    teacher = torch.where(q > 0, q.log(), suppressed)
    log2 = math.log(2)
    assert divergence(student, teacher, "kl-bwd").item() == pytest.approx(0.5 * log2 - 0.25 * log2)
    assert divergence(student, teacher, "kl-fwd").item() == pytest.approx(-0.25 * log2 + 0.5 * log2)
    assert divergence(student, teacher, "tv").item() == pytest.approx(0.25)
    assert divergence(student, teacher, "mse").item() == pytest.approx(2 * log2 ** 2 / 3)  # over the 3 real ids
    with pytest.raises(ValueError, match="divergence must be one of"):
        divergence(student, teacher, "js")


def test_padding_and_given_tokens_are_never_hidden():
    tokens = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(0))
    valid = torch.arange(12)[None] < torch.tensor([12, 7, 3])[:, None]
    given = torch.zeros_like(valid)
    given[:, 0] = True  # BOS
    noise = draw_distill_noise(3, 12, 2, generator=torch.Generator().manual_seed(1))
    noise.t[:] = 0.999  # nearly every token hidden
    hidden = hidden_positions(tokens, noise, LogLinearSchedule(), given, valid)
    assert not (hidden & ~valid).any() and not hidden[:, 0].any()
    assert int(hidden.sum()) == int((valid & ~given).sum()) == 11 + 6 + 2


def test_step_times_are_evenly_spaced_and_the_rounds_divide_the_steps():
    times = teacher_times(torch.tensor([0.5, 0.9, 0.01]), 0.125, 2)
    assert torch.allclose(times, torch.tensor([[0.5, 0.375, 0.25], [0.9, 0.775, 0.65], [0.01, 0.0, 0.0]]))
    # The authors' t * linspace(1, 0, n) + (1 - t) * t_end would give 0.749 and 0.249 at t = 0.5.
    paper = DistillConfig()
    assert paper.rounds == 5 and paper.total_steps == 50_000
    assert [paper.student_steps(r) for r in range(5)] == [512, 256, 128, 64, 32]
    assert [paper.round_of(s) for s in (0, 9_999, 10_000, 49_999)] == [0, 0, 1, 4]
    four = DistillConfig(start_steps=512, end_steps=8, num_distill_steps=4, round_steps=7)
    assert [four.teacher_steps(r) for r in range(four.rounds)] == [512, 128, 32] and four.total_steps == 21
    for bad, message in (({"start_steps": 100}, "times a power"), ({"num_distill_steps": 1}, "at least 2"),
                         ({"end_steps": 1024}, "must exceed")):
        with pytest.raises(ValueError, match=message):
            DistillConfig(**bad)


@pytest.fixture(scope="module")
def tiny_distillation(text_run, tmp_path_factory):
    """distill-tiny (two rounds of 3 steps, 8 -> 4 -> 2 sampling steps) of the session's text-tiny
    run, with a checkpoint at every step."""
    run_dir = tmp_path_factory.mktemp("distill") / "student"
    config = _config(text_run, ["save_every=1", "keep_checkpoints=50", "eval_every=3"])
    distill(config, run_dir, log=lambda *a: None)
    return run_dir


def _config(teacher_dir, overrides):
    return distillation_config(teacher_dir, *distill_preset("distill-tiny"), overrides)[0]


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_a_distillation_is_a_run_with_its_rounds(tiny_distillation, text_run):
    run_dir = tiny_distillation
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert [(r["step"], r["round"], r["student_steps"]) for r in trained] == [
        (1, 1, 4), (2, 1, 4), (3, 1, 4), (4, 2, 2), (5, 2, 2), (6, 2, 2)]
    assert [r["step"] for r in records if "val_divergence" in r] == [3, 6]
    assert sorted(p.name for p in (run_dir / ROUNDS_DIR).iterdir()) == ["round-0", "round-1", "round-2"]
    teacher = load_file(str(text_run / "checkpoints/step_0000020/ema.safetensors"))
    for round_, weights in ((0, teacher), (1, load_file(str(run_dir / "checkpoints/step_0000003/model.safetensors"))),
                            (2, load_file(str(run_dir / "checkpoints/step_0000006/model.safetensors")))):
        kept = load_file(str(run_dir / ROUNDS_DIR / f"round-{round_}" / "model.safetensors"))
        assert all(torch.equal(kept[k], weights[k]) for k in kept), round_
    # The teacher of round 2 is round 1's student; before that, the first teacher.
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(run_dir / "checkpoints/step_0000003/teacher.safetensors")).values(),
                                                 teacher.values()))
    round_one = load_file(str(run_dir / ROUNDS_DIR / "round-1" / "model.safetensors"))
    later = load_file(str(run_dir / "checkpoints/step_0000004/teacher.safetensors"))
    assert all(torch.equal(later[k], round_one[k]) for k in later)
    card = json.loads((run_dir / ROUNDS_DIR / "round-1" / "config.json").read_text())["card"]
    assert card["distillation"] == {"round": 1, "sampling_steps": 4, "teacher_steps": 8, "divergence": "kl-bwd"}
    assert (run_dir / "loss.png").is_file() and read_run_config(run_dir).distill.rounds == 2


def test_the_teacher_and_each_round_take_the_weights_they_are_named_after(text_run, tmp_path):
    run_dir = tmp_path / "student"
    config = _config(text_run, ["teacher_weights=raw", "distill.grow_from=ema", "train.ema=0.5"])
    distill(config, run_dir, log=lambda *a: None)
    raw, ema = (load_file(str(text_run / f"checkpoints/step_0000020/{name}.safetensors")) for name in ("model", "ema"))
    assert not all(torch.equal(raw[k], ema[k]) for k in raw)
    for round_, weights in ((0, raw), (1, run_dir / "checkpoints/step_0000003/ema.safetensors"),
                            (2, run_dir / "checkpoints/step_0000006/ema.safetensors")):
        weights = weights if isinstance(weights, dict) else load_file(str(weights))
        kept = load_file(str(run_dir / ROUNDS_DIR / f"round-{round_}" / "model.safetensors"))
        assert all(torch.equal(kept[k], weights[k]) for k in kept), round_


@pytest.mark.parametrize("killed_after", [3, 4])  # at the round boundary (teacher not yet grown), and after it
def test_a_distillation_killed_across_a_round_boundary_resumes_exactly(tiny_distillation, tmp_path, killed_after):
    run_dir = tmp_path / "killed"
    shutil.copytree(tiny_distillation, run_dir)
    # What a kill after step N's checkpoint leaves: later checkpoints and rounds gone, metrics run on.
    for checkpoint in (run_dir / "checkpoints").iterdir():
        if int(checkpoint.name[5:]) > killed_after:
            shutil.rmtree(checkpoint)
    shutil.rmtree(run_dir / ROUNDS_DIR / "round-2")
    if killed_after < 4:
        shutil.rmtree(run_dir / ROUNDS_DIR / "round-1")
    distill(read_run_config(run_dir), run_dir, resume=True, log=lambda *a: None)
    assert losses(run_dir) == losses(tiny_distillation)
    final = "checkpoints/step_0000006/model.safetensors"
    a, b = load_file(str(tiny_distillation / final)), load_file(str(run_dir / final))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (run_dir / ROUNDS_DIR / "round-1").is_dir() and (run_dir / ROUNDS_DIR / "round-2").is_dir()


REPETITIVE = ("the cat sat on the mat and the dog sat on the log. " * 6 + "\n\n"
              "a red hen ran to the big barn and a fat pig ran to the mud. " * 6 + "\n\n") * 30


def test_distilling_on_repetitive_text_pulls_a_student_to_its_teacher(tmp_path):
    """From the teacher's own weights the divergence cannot fall far: most of it is the spread of
    the teacher's draws, which no one-step student can know (for this teacher 89% of KL(student ||
    teacher) at the per-x_t optimum, estimated from 32 draws). So the student starts perturbed (its
    output layer), and distillation must bring it back near the teacher's own level."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(REPETITIVE)
    teacher_dir = tmp_path / "teacher"
    overrides = [f"data.source={corpus}", "data.vocab_size=280", "data.val_every=3", "data.chunk_chars=200",
                 "model.length=24", "max_steps=200", "lr=3e-3", "warmup_steps=20", "ema=0", "eval_every=0",
                 "save_every=0", "batch_size=16"]
    from pgm.presets import preset

    train(preset("text-tiny").with_overrides(overrides), teacher_dir, log=lambda *a: None)
    config = _config(teacher_dir, ["teacher_weights=raw", "distill.start_steps=16", "distill.end_steps=8",
                                   "distill.round_steps=120", "eval_every=120", "eval_rows=32", "batch_size=16",
                                   "lr=2e-3"])
    distiller = Distiller(config, tmp_path / "student", Distributed(), log=lambda *a: None)
    distiller.prepare_data()
    distiller.device = torch.device("cpu")
    distiller.build()
    distiller.resume()
    own_level = distiller.validation_record()["val_divergence"]
    with torch.no_grad():
        weight = distiller.model.output_layer.linear.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std() * 2)
    strayed = distiller.validation_record()["val_divergence"]
    distiller.run()
    records = (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()
    after = json.loads(records[-1])["val_divergence"]
    assert strayed > 5 * own_level, (own_level, strayed)
    assert after < 0.25 * strayed and after < 2 * own_level, (own_level, strayed, after)


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    """ar-tiny on text-tiny's data (the same tokenizer): an evaluator, and a model SDTT refuses."""
    from pgm.presets import preset

    run_dir = tmp_path_factory.mktemp("ar") / "ar"
    train(preset("ar-tiny"), run_dir, log=lambda *a: None)
    return run_dir


def test_pgm_distill_then_sample_and_report_from_the_command_line(text_run, ar_run, tmp_path, pgm_main):
    out = tmp_path / "student"
    code, printed, error = pgm_main("distill", text_run, "--preset", "distill-tiny", "--out", out, "divergence=kl-fwd")
    assert code == 0, error
    assert read_run_config(out).distill.divergence == "kl-fwd"  # a setting after the options counts too
    assert "the 2-step student" in printed and (out / ROUNDS_DIR / "round-2" / "model.safetensors").is_file()
    code, printed, error = pgm_main("sample", out, "--steps", "2", "--num-samples", "2")
    assert code == 0 and "generated in 2 steps" in error, error
    code, printed, error = pgm_main("report", out, "--evaluator", ar_run, "--num-samples", "2", "--steps", "2", "4",
                                    "--out", tmp_path / "report")
    assert code == 0, error
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0] == "| round | trained for | 2 steps | 4 steps |" and len(table) == 1 + 3  # teacher, rounds 1, 2
    assert table[1].startswith("| teacher | 8 |") and table[3].startswith("| 2 | 2 |")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["round"] for r in report["runs"][0]["rounds"]] == [0, 1, 2]
    assert (tmp_path / "report" / "distillation.png").is_file()
    code, _, error = pgm_main("distill", "--resume", "--out", out)
    assert code == 0, error  # already done: nothing to add
    code, _, error = pgm_main("train", "--resume", "--out", out)
    assert code == 2 and "is a distillation, run by pgm distill" in error, error


def test_pgm_distill_refuses_in_one_sentence(text_run, ar_run, tmp_path, pgm_main):
    cases = [
        ((text_run, "model.hidden_size=64"), "the teacher's architecture"),
        ((text_run, "max_steps=5"), "set distill.round_steps"),
        ((text_run, "data.tokenizer=gpt2"), "the teacher's tokenizer"),
        ((text_run, "distill.teacher=x"), "first argument"),
        ((text_run, "distill.start_steps=100"), "times a power of num_distill_steps"),
        ((text_run, "distill.divergence=js"), "divergence must be one of"),
        ((text_run, "teacher_weights=avg"), "teacher_weights must be one of"),
        ((ar_run,), "SDTT distils text PGMs and MDLMs; .* holds a model of kind ar"),
        ((), "name the teacher"),
        (("--resume", "--out", text_run), "is a training run, not a distillation"),
        ((text_run, "--resume", "--out", tmp_path), "drop the teacher"),
        ((tmp_path / "nothing",), "does not exist"),
        ((text_run, "--steps", "3"), "unrecognized arguments: --steps 3"),
        ((text_run, "distill.grow_from=ema"), "needs an average of the student's weights"),
    ]
    for args, message in cases:
        code, _, error = pgm_main("distill", *args, "--preset", "distill-tiny", "--out", tmp_path / "new") \
            if "--out" not in args else pgm_main("distill", *args)
        assert code == 2 and "Traceback" not in error, (args, error)
        assert __import__("re").search(message, error), (args, error)
    assert not (tmp_path / "new").exists()


def test_two_processes_distil_as_one_process_does(text_run, tiny_distillation, tmp_path):
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "pgm", "distill", str(text_run), "--preset", "distill-tiny", "--out", str(run_dir)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = losses(tiny_distillation), losses(run_dir)
    assert [s for s, _ in one] == [s for s, _ in two]
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, two)) < 1e-5, (one, two)
    validated = [[json.loads(line)["val_divergence"] for line in (directory / "metrics.jsonl").read_text().splitlines()
                  if "val_divergence" in line] for directory in (tiny_distillation, run_dir)]
    assert validated[0] == pytest.approx(validated[1], rel=1e-4, abs=1e-7)  # sums in another order
    final = "checkpoints/step_0000006/model.safetensors"
    a, b = load_file(str(tiny_distillation / final)), load_file(str(run_dir / final))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_distillation_targets_are_computed_from_the_rounds_as_stated():
    from pgm.report import check_distill_targets

    def round_(cells):  # steps -> (gen_ppl, entropy, tokens/s)
        return {"samples": [{"asked_steps": s, "gen_ppl": g, "entropy": e, "tokens_per_s": v}
                            for s, (g, e, v) in cells.items()]}

    pgm = {"name": "p", "kind": "pgm", "rounds": [
        round_({16: (200.0, 4.0, 10.0), 32: (150.0, 4.0, 5.0), 128: (100.0, 4.0, 1.0)}),
        round_({16: (200 / 2 ** 0.25, 4.1, 12.0), 32: (90.0, 3.96, 8.0), 128: (95.0, 4.0, 2.0)})]}
    mdlm = {"name": "m", "kind": "mdlm", "rounds": [
        round_({16: (300.0, 4.0, 1.0), 128: (250.0, 4.0, 1.0)}),
        round_({16: (290.0, 4.0, 3.0), 32: (280.0, 4.0, 2.0), 128: (270.0, 4.0, 1.0)})]}
    got = [(t["value"], t["met"]) for t in check_distill_targets([pgm, mdlm])]
    assert got[0] == (pytest.approx(2.0), True) and got[1] == (pytest.approx(1.2), False)  # teachers 16 / 128
    assert got[2] == (pytest.approx(0.25), False)  # log(200 / 168.2) / log(200 / 100)
    assert got[3] == (pytest.approx(0.9), True)  # student at 32 / teacher at 128
    assert got[4] == (pytest.approx(0.025), True)  # entropy: 4.1 / 4.0 at 16 steps
    assert got[5] == (pytest.approx(2.0), False)  # tokens/s: 12 / 3 and 8 / 2 at 16 and 32, 2 / 1 at 128
