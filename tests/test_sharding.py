"""FSDP2 (train.parallel=fsdp): two sharded processes compute what one process computes, resume
exactly after a kill, their sharded checkpoints read whole and consolidate; runs change between
sharded and unsharded on resume; activation checkpointing changes no number."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from test_train import losses, wait_for_checkpoint

import pgm
from pgm.cli import main
from pgm.errors import RunError
from pgm.eval.perplexity import rank_parts
from pgm.models import build_model
from pgm.objectives import objective_for
from pgm.runs import checkpoint_dirs, is_sharded, latest_checkpoint, load_checkpoint, read_run_config
from pgm.sharding import checkpoint_activations
from pgm.train import train

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pgm", "train"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def relative_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)) for k in a)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A two-process sharded text-tiny run, killed (SIGKILL, torchrun and its workers) after its
    checkpoint of step 6 or later, then resumed by two processes; (run, the step it resumed from).
    It validates on 17 rows (batches of 8, 8 and 1: one process has no row of the last), which
    only the reference's training losses can be compared with."""
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    settings = ["log_every=1", "save_every=2", "keep_checkpoints=50", "train.parallel=fsdp", "eval_rows=17"]
    process = subprocess.Popen(TORCHRUN + ["--preset", "text-tiny", "--out", str(run_dir), *settings],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    wait_for_checkpoint(process, run_dir, 6, seconds=240)
    workers = children(process.pid)  # torchrun starts each in a session of its own
    for pid in [process.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    resumed_from = int(latest_checkpoint(run_dir).name[5:])
    done = subprocess.run(TORCHRUN + ["--out", str(run_dir), "--resume"], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(workers) == 2 and f"from step {resumed_from}\n" in done.stdout, done.stdout
    return run_dir, resumed_from


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_two_sharded_processes_match_one_process_and_resume_exactly_after_a_kill(text_run, killed_and_resumed):
    run_dir, resumed_from = killed_and_resumed
    assert 6 <= resumed_from < 20, "the run should have been killed mid-run"
    one, two = losses(text_run, "loss"), losses(run_dir, "loss")
    assert [s for s, _ in one] == [s for s, _ in two]  # the killed steps' records are replayed, not doubled
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, two)) < 1e-4
    assert [s for s, _ in losses(run_dir, "val_nll")] == [10, 20]
    final = latest_checkpoint(run_dir)
    assert final.name == "step_0000020" and is_sharded(final)
    assert sorted(p.name for p in (final / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    whole, reference = load_checkpoint(final), load_checkpoint(latest_checkpoint(text_run))
    assert relative_difference(reference["model"], whole["model"]) < 1e-3
    assert relative_difference(reference["ema"], whole["ema"]) < 1e-3
    assert whole["state"]["ema_updates"] == reference["state"]["ema_updates"] == 20
    for index, moments in reference["optimizer"]["state"].items():
        assert int(whole["optimizer"]["state"][index]["step"]) == int(moments["step"]) == 20
        assert torch.allclose(whole["optimizer"]["state"][index]["exp_avg"], moments["exp_avg"], atol=1e-6)
    assert whole["optimizer"]["param_groups"][0]["lr"] == reference["optimizer"]["param_groups"][0]["lr"]


def test_a_sharded_run_loads_and_consolidates_into_the_usual_files(killed_and_resumed, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_and_resumed[0], run_dir)
    final = latest_checkpoint(run_dir)
    whole = load_checkpoint(final)
    pipe = pgm.load(run_dir)  # the average, read from the shards
    assert all(torch.equal(value, whole["ema"][name]) for name, value in pipe.model.state_dict().items())

    assert main(["consolidate", str(run_dir)]) == 0
    assert "step_0000020: model.safetensors" in capsys.readouterr().out
    assert not is_sharded(final) and is_sharded(checkpoint_dirs(run_dir)[-2])
    for name in ("model", "ema"):
        written = load_file(str(final / f"{name}.safetensors"))
        assert sorted(written) == sorted(whole[name]) and all(torch.equal(written[k], whole[name][k]) for k in written)
    optimizer = torch.load(final / "optimizer.pt", weights_only=True)
    assert all(torch.equal(optimizer["state"][i]["exp_avg_sq"], whole["optimizer"]["state"][i]["exp_avg_sq"])
               for i in optimizer["state"])

    assert main(["consolidate", str(run_dir)]) == 2
    assert "nothing to consolidate" in capsys.readouterr().err
    assert main(["consolidate", str(run_dir), "--step", "3"]) == 2
    assert "no checkpoint of step 3 (it has steps" in capsys.readouterr().err
    assert main(["consolidate", str(run_dir), "--all"]) == 0
    assert not any(is_sharded(checkpoint) for checkpoint in checkpoint_dirs(run_dir))


def _cut_back_to(run_dir: Path, step: int) -> None:
    for checkpoint in checkpoint_dirs(run_dir):
        if int(checkpoint.name[5:]) > step:
            shutil.rmtree(checkpoint)


def test_a_sharded_run_continues_unsharded(text_run, killed_and_resumed, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_and_resumed[0], run_dir)
    _cut_back_to(run_dir, 10)
    assert is_sharded(latest_checkpoint(run_dir))
    train(read_run_config(run_dir).with_overrides(["train.parallel=ddp"]), run_dir, resume=True, log=lambda *a: None)
    assert max(abs(a - b) for (_, a), (_, b) in zip(losses(text_run, "loss"), losses(run_dir, "loss"))) < 1e-4
    # One process validates the 17 rows that two sharded ones split unevenly, with the same result.
    sharded, whole = losses(killed_and_resumed[0], "val_nll"), losses(run_dir, "val_nll")
    assert [s for s, _ in whole] == [10, 20] and abs(sharded[-1][1] - whole[-1][1]) < 1e-4
    final = latest_checkpoint(run_dir)
    assert not is_sharded(final)
    assert relative_difference(load_file(str(latest_checkpoint(text_run) / "model.safetensors")),
                               load_file(str(final / "model.safetensors"))) < 1e-3


def test_an_unsharded_run_continues_sharded_in_one_process(text_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(text_run, run_dir)
    _cut_back_to(run_dir, 10)
    done = subprocess.run([sys.executable, "-m", "pgm", "train", "--out", str(run_dir), "--resume",
                           "train.parallel=fsdp", "keep_checkpoints=1"], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 process(es)" in done.stdout
    assert max(abs(a - b) for (_, a), (_, b) in zip(losses(text_run), losses(run_dir))) < 1e-4
    final = latest_checkpoint(run_dir)
    assert is_sharded(final) and checkpoint_dirs(run_dir) == [final]
    whole, reference = load_checkpoint(final), load_checkpoint(latest_checkpoint(text_run))
    assert relative_difference(reference["model"], whole["model"]) < 1e-3
    assert relative_difference(reference["ema"], whole["ema"]) < 1e-3


def test_activation_checkpointing_recomputes_the_same_values_and_gradients_and_keeps_fewer_tensors():
    config = tiny_config().model
    config.dropout = 0.1  # the recomputation must replay the same dropout masks
    tokens = torch.randint(0, config.vocab_size - 1, (4, config.length), generator=torch.Generator().manual_seed(1))

    def loss_and_gradients(recompute: bool):
        torch.manual_seed(0)
        model = build_model(config).train()
        with torch.no_grad():  # away from the zero-initialised gates, behind which dropout would change nothing
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter), alpha=0.1)
        if recompute:
            checkpoint_activations(model)
        objective = objective_for(model)
        noise = objective.draw_noise(4, config.length, generator=torch.Generator().manual_seed(2))
        saved = []
        torch.manual_seed(3)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = objective.loss(model, tokens, noise=noise).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved)

    plain_loss, plain, plain_saved = loss_and_gradients(False)
    loss, recomputed, saved = loss_and_gradients(True)
    assert torch.equal(loss, plain_loss)
    assert all(torch.allclose(recomputed[n], plain[n], atol=1e-7, rtol=1e-5) for n in plain)
    assert saved < plain_saved / 2, (saved, plain_saved)


@pytest.mark.parametrize("lockstep", [False, True])
def test_each_batch_row_is_scored_by_exactly_one_process(lockstep):
    for size in range(0, 10):
        for world_size in (1, 2, 3):
            for micro in (0, 1, 2, 3):
                scored, calls = [], []
                for rank in range(world_size):
                    parts = list(rank_parts(size, rank, world_size, micro, lockstep))
                    calls.append(len(parts))
                    scored += [row for part, kept in parts if kept for row in range(part.start, part.stop)]
                    assert all(part.stop - part.start <= (micro or size) or not kept for part, kept in parts)
                    assert all(not kept for part, kept in parts if part.start >= part.stop)
                    assert lockstep or all(kept for _, kept in parts)
                assert sorted(scored) == list(range(size)), (size, world_size, micro)
                if lockstep and size:
                    assert len(set(calls)) == 1, (size, world_size, micro, calls)


def test_distillation_refuses_to_shard(tmp_path):
    from pgm.distill import distill

    config = tiny_config(parallel="fsdp")
    with pytest.raises(RunError, match="pgm distill runs with train.parallel=ddp"):
        distill(config, tmp_path / "d")
