"""Training runs end to end: run directories, exact resumption, crashes during a save, and
two processes computing what one process computes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

import pgm.runs
from pgm.hub import load_pretrained_dir
from pgm.runs import latest_checkpoint, read_run_config
from pgm.train import train


def losses(run_dir: Path, key: str | None = None) -> list[tuple[int, float]]:
    """(step, training loss or validation ELBO) as logged; `key` keeps only one of the two."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss", r.get("val_nll"))) for r in records if key is None or key in r]


@pytest.fixture
def reference_run(text_run):
    """An uninterrupted text-tiny run of 20 steps."""
    return text_run


def test_a_run_directory_holds_everything(reference_run):
    config = read_run_config(reference_run)
    assert config.model.kind == "pgm" and config.model.vocab_size == 385 and config.model.mask_token_id == 384
    assert (reference_run / "tokenizer" / "tokenizer.json").is_file()
    assert (reference_run / "loss.png").stat().st_size > 1000
    steps = [p.name for p in pgm.runs.checkpoint_dirs(reference_run)]
    assert steps == ["step_0000010", "step_0000020"]
    for name in ("model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"):
        assert (reference_run / "checkpoints" / "step_0000020" / name).is_file()
    logged = losses(reference_run)
    assert [s for s, _ in logged if s == 20] == [20, 20]  # a training loss and a validation ELBO
    model, _ = load_pretrained_dir(reference_run)
    assert not model.training
    ema = load_file(str(reference_run / "checkpoints" / "step_0000020" / "ema.safetensors"))
    raw = load_file(str(reference_run / "checkpoints" / "step_0000020" / "model.safetensors"))
    assert not torch.equal(ema["encoder.blocks.0.attn_qkv.weight"], raw["encoder.blocks.0.attn_qkv.weight"])


def test_keep_checkpoints_prunes_old_ones(tmp_path):
    train(tiny_config(save_every=5, keep_checkpoints=2), tmp_path / "run", log=lambda *a: None)
    assert [p.name for p in pgm.runs.checkpoint_dirs(tmp_path / "run")] == ["step_0000015", "step_0000020"]


def test_resume_after_a_crash_in_the_middle_of_a_save_replays_every_step(reference_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "crashed"
    real_save = pgm.runs.save_weights
    calls = {"n": 0}

    class Killed(BaseException):
        """Like SIGKILL: nothing in the process gets to react."""

    def dying_save(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint: model.safetensors written, then the process "dies"
            real_save(tensors, path)
            raise Killed
        real_save(tensors, path)

    monkeypatch.setattr(pgm.runs, "save_weights", dying_save)
    with pytest.raises(Killed):
        train(tiny_config(), run_dir, log=lambda *a: None)
    monkeypatch.setattr(pgm.runs, "save_weights", real_save)
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert "step_0000010" in leftovers and any(name.startswith(".tmp-") for name in leftovers)
    assert latest_checkpoint(run_dir).name == "step_0000010"

    train(read_run_config(run_dir), run_dir, resume=True, log=lambda *a: None)
    assert losses(run_dir) == losses(reference_run)
    assert not any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())
    final = "checkpoints/step_0000020/model.safetensors"
    a, b = load_file(str(reference_run / final)), load_file(str(run_dir / final))
    assert all(torch.equal(a[k], b[k]) for k in a)


def wait_for_checkpoint(process: subprocess.Popen, run_dir: Path, step: int, seconds: float) -> None:
    """Until `run_dir` holds a checkpoint of `step` or later (or the process ends, or time runs out)."""
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        found = latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
        if found is not None and int(found.name[5:]) >= step:
            return
        time.sleep(0.05)


def test_a_killed_process_resumes_exactly(reference_run, tmp_path):
    run_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "pgm", "train", "--preset", "text-tiny", "--out", str(run_dir), "log_every=1",
               "save_every=2", "keep_checkpoints=50"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(process, run_dir, 6, seconds=120)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed_from = int(latest_checkpoint(run_dir).name[5:])
    assert 6 <= resumed_from < 20, "the process should have been killed mid-run"
    done = subprocess.run([sys.executable, "-m", "pgm", "train", "--out", str(run_dir), "--resume"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert losses(run_dir) == losses(reference_run)


def test_resume_refuses_to_change_the_recipe(reference_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(reference_run, run_dir)
    with pytest.raises(ValueError, match="cannot change train.lr"):
        train(read_run_config(run_dir).with_overrides(["lr=0.1"]), run_dir, resume=True, log=lambda *a: None)
    with pytest.raises(ValueError, match="already holds a trained run"):
        train(tiny_config(), run_dir, log=lambda *a: None)


def test_two_processes_match_one_process_with_the_same_global_batch(reference_run, tmp_path):
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "pgm", "train", "--preset", "text-tiny", "--out", str(run_dir), "log_every=1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = losses(reference_run), losses(run_dir)
    assert [s for s, _ in one] == [s for s, _ in two]
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, two)) < 1e-4
    final = "checkpoints/step_0000020/model.safetensors"
    a, b = load_file(str(reference_run / final)), load_file(str(run_dir / final))
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)) for k in a)
    assert worst < 1e-3, worst


LEAVE_THE_GROUP = """
import os
import sys
import torch
from pgm.train import leave_distributed, setup_distributed


def threads():
    return len(os.listdir("/proc/self/task"))


def one_step():
    network = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    network(torch.randn(2, 4)).sum().backward()
    loss = torch.ones(())
    torch.distributed.all_reduce(loss)


before = threads()
setup_distributed("cpu")
during = threads()
one_step()
leave_distributed()
with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]), "w") as counts:
    counts.write(f"{before} {during} {threads()}")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_leaving_the_process_group_joins_its_worker_threads(tmp_path):
    # Worker threads that outlive destroy_process_group can abort the process at exit (4 runs in 78 did).
    script = tmp_path / "leave.py"
    script.write_text(LEAVE_THE_GROUP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in range(2):
        before, during, after = map(int, (tmp_path / f"rank{rank}").read_text().split())
        assert during > before, "gloo should have started worker threads"
        assert after == before


@pytest.mark.parametrize("attention", ["grouped", "jagged"])
def test_train_attention_runs_the_training_view_that_way_with_the_same_losses(reference_run, tmp_path, monkeypatch,
                                                                              attention):
    import pgm.models.layers as layers

    calls = []
    real = getattr(layers, f"{attention}_attention")
    monkeypatch.setattr(layers, f"{attention}_attention", lambda *args: calls.append(1) or real(*args))
    run_dir = tmp_path / attention
    train(tiny_config(attention=attention, max_steps=10), run_dir, log=lambda *a: None)
    assert calls and read_run_config(run_dir).train.attention == attention
    one = dict(losses(reference_run, "loss"))
    assert max(abs(one[step] - value) for step, value in losses(run_dir, "loss")) < 1e-4
    assert layers._training_attention == "dense"  # the setting ends with the run


def test_train_attention_is_refused_for_a_model_without_groups(tmp_path):
    from pgm.errors import RunError
    from pgm.presets import preset

    config = preset("mdlm-tiny").with_overrides(["attention=jagged", "max_steps=2"])
    with pytest.raises(RunError, match="train.attention=jagged applies to a PGM's training view; a mdlm model"):
        train(config, tmp_path / "mdlm", log=lambda *a: None)


def test_gradient_accumulation_matches_a_full_batch(reference_run, tmp_path):
    run_dir = tmp_path / "accumulated"
    train(tiny_config(micro_batch_size=4, max_steps=10), run_dir, log=lambda *a: None)
    one = dict(losses(reference_run, "loss"))
    accumulated = losses(run_dir, "loss")
    assert len(accumulated) == 10
    assert max(abs(one[step] - value) for step, value in accumulated) < 1e-4
