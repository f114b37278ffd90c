"""What a damaged run directory, a full disk, a killed writer's leftovers and the process's umask do
to the commands that read and write runs (issue 32, classes 3, 4 and 9): one sentence naming the file
at fault and what still works, nothing lost, nothing left behind, every file as the umask says.

Each test damages a copy of the session's `text_run` (20 steps, checkpoints of steps 10 and 20)."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pgm import formats
from pgm.formats import remove_partial

LAST, EARLIER = "checkpoints/step_0000020", "checkpoints/step_0000010"


@pytest.fixture
def run(text_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(text_run, copy)
    return copy


def refusal(result, *fragments) -> str:
    """The one line a refused command printed (exit 2, no traceback), checked to hold `fragments`."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def command(name: str, run: Path) -> list:
    return {"sample": ["sample", run, "--steps", "4"],
            "sample-raw": ["sample", run, "--steps", "4", "--weights", "raw"],
            "eval": ["eval", run, "--passes", "1", "--rows", "2"],
            "resume": ["train", "--resume", "--out", run, "max_steps=21", "progress=false"]}[name]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class Touches:
    """A pickle that, if it were ever run, would create the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


# (damage, the file at fault, the commands that refuse, one that still works, words of what still works)
DAMAGES = {
    "optimizer of another kind": (lambda run: torch.save({"weights": torch.zeros(2)}, run / LAST / "optimizer.pt"),
                                  f"{LAST}/optimizer.pt", ("resume",), "sample", "fall back to the checkpoint of step 10"),
    "optimizer a list": (lambda run: torch.save([1, 2], run / LAST / "optimizer.pt"),
                         f"{LAST}/optimizer.pt", ("resume",), "eval", "sampling and evaluation still read its weights"),
    "optimizer poisoned": (lambda run: (run / LAST / "optimizer.pt").write_bytes(pickle.dumps(Touches(run / "ran"))),
                           f"{LAST}/optimizer.pt", ("resume",), "sample", "a foreign or tampered file"),
    "optimizer truncated": (lambda run: truncate(run / LAST / "optimizer.pt"),
                            f"{LAST}/optimizer.pt", ("resume",), "sample-raw", "step 10"),
    "optimizer missing": (lambda run: (run / LAST / "optimizer.pt").unlink(),
                          f"{LAST}/optimizer.pt", ("resume",), "sample", "does not exist"),
    "state a list": (lambda run: (run / LAST / "state.json").write_text("[1, 2]"),
                     f"{LAST}/state.json", ("sample", "eval", "resume"), None, "a JSON list"),
    "state step not a number": (lambda run: (run / LAST / "state.json").write_text('{"step": "x"}'),
                                f"{LAST}/state.json", ("sample", "eval", "resume"), None, 'its step is "x"'),
    "state step negative": (lambda run: (run / LAST / "state.json").write_text('{"step": -3}'),
                            f"{LAST}/state.json", ("sample", "resume"), None, "its step is -3"),
    "state step of another checkpoint": (lambda run: (run / LAST / "state.json").write_text('{"step": 7}'),
                                         f"{LAST}/state.json", ("sample", "resume"), None, "directory is step 20"),
    "state ema_updates a float": (lambda run: (run / LAST / "state.json").write_text(
                                  '{"step": 20, "ema_updates": 2.5}'), f"{LAST}/state.json", ("resume",), None,
                                  "its ema_updates is 2.5"),
    "state not UTF-8": (lambda run: (run / LAST / "state.json").write_bytes(b"\xff\x00"),
                        f"{LAST}/state.json", ("sample", "resume"), None, "step 10"),
    "state missing": (lambda run: (run / LAST / "state.json").unlink(),
                      f"{LAST}/state.json", ("eval", "resume"), None, "does not exist"),
    "raw weights truncated": (lambda run: truncate(run / LAST / "model.safetensors"),
                              f"{LAST}/model.safetensors", ("sample-raw",), "sample", "--weights ema"),
    "averaged weights truncated": (lambda run: truncate(run / LAST / "ema.safetensors"),
                                   f"{LAST}/ema.safetensors", ("sample", "eval"), "sample-raw",
                                   "--weights raw"),
    "raw weights missing": (lambda run: (run / LAST / "model.safetensors").unlink(),
                            f"{LAST}/model.safetensors", ("sample-raw", "resume"), "eval", "step 10"),
    "raw weights of another shape": (lambda run: formats.save_weights(
                                     {"vocab_embed.embedding": torch.zeros(3, 3)}, run / LAST / "model.safetensors"),
                                     f"{LAST}/model.safetensors", ("resume",), "sample", "step 10"),
    "config a list": (lambda run: (run / "config.json").write_text("[]"),
                      "config.json", ("sample", "resume"), None, "a JSON list"),
    "config not JSON": (lambda run: (run / "config.json").write_text("{garbage"),
                        "config.json", ("sample", "resume"), None, "not valid JSON"),
    "config model section a number": (lambda run: (run / "config.json").write_text('{"model": 3}'),
                                      "config.json", ("sample", "resume"), None, "damaged"),
}


@pytest.mark.parametrize("damage,at_fault,refusing,working,still", DAMAGES.values(), ids=list(DAMAGES))
def test_a_damaged_file_is_named_in_one_sentence_and_what_does_not_read_it_still_works(
        run, pgm_main, damage, at_fault, refusing, working, still):
    damage(run)
    for name in refusing:
        code, out, err = result = pgm_main(*command(name, run))
        refusal(result, str(run / at_fault), still)
        assert "resuming" not in out  # refused before claiming to resume
    assert not (run / "ran").exists()  # nothing pickled ever runs
    if working is not None:
        code, _, err = pgm_main(*command(working, run))
        assert code == 0, err


def test_what_the_sentence_offers_works_deleting_the_damaged_checkpoint_resumes_from_the_one_before(run, pgm_main):
    (run / LAST / "optimizer.pt").write_bytes(b"not a checkpoint")
    line = refusal(pgm_main(*command("resume", run)), "optimizer.pt")
    assert f"delete {run / LAST}" in line
    shutil.rmtree(run / LAST)
    code, out, err = pgm_main(*command("resume", run))
    assert code == 0, err
    assert "from step 10" in out


def test_the_only_checkpoint_damaged_says_so(run, pgm_main):
    shutil.rmtree(run / EARLIER)
    (run / LAST / "state.json").write_text("{}")
    refusal(pgm_main(*command("sample", run)), "state.json", "its step is null", "the run's only checkpoint")


def test_garbage_in_the_metrics_costs_its_lines_only(run, pgm_main):
    metrics = run / "metrics.jsonl"
    kept = metrics.read_bytes()
    metrics.write_bytes(kept + b'garbage\n[1]\n{"step": "x", "val_nll": 1}\n\xff\xfe\n{"step": 20, "val_nll": "y"}\n')
    code, _, err = pgm_main(*command("sample", run))
    assert code == 0, err
    code, out, err = pgm_main(*command("resume", run))
    assert code == 0, err
    assert "resuming" in out
    assert metrics.read_bytes().startswith(kept)  # the good records stay; the damaged lines are gone
    assert b"garbage" not in metrics.read_bytes()


# --- class 4: a full disk, and leftovers --------------------------------------------------------

def fill(directory: Path, room: int) -> Path:
    """A file that leaves about `room` bytes free on the file system of `directory`."""
    stats = os.statvfs(directory)
    filler = directory / "filler"
    filler.write_bytes(b"\0" * max(stats.f_bavail * stats.f_frsize - room, 0))
    return filler


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (needs root and the right to mount, as CI's container has); skipped where it cannot be
    mounted: the monkeypatched disk-full test below runs everywhere."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def checkpoint_names(run: Path) -> list[str]:
    return sorted(path.name for path in (run / "checkpoints").iterdir())


def leftovers(run: Path) -> list[Path]:
    return [path for path in run.rglob("*") if ".tmp-" in path.name]


# room left: none for the weights (safetensors says "No space left"), or for the weights but not the
# optimizer (torch.save only says "unexpected pos": the full disk is found by looking)
@pytest.mark.parametrize("room", [300_000, 1_400_000], ids=["weights", "optimizer"])
def test_a_full_disk_during_a_checkpoint_is_one_sentence_and_the_last_checkpoint_resumes_exactly(
        small_disk, text_run, tmp_path, pgm_main, room):
    run = small_disk / "run"
    shutil.copytree(text_run, run)
    filler = fill(small_disk, room)
    before = checkpoint_names(run)
    line = refusal(pgm_main("train", "--resume", "--out", run, "max_steps=22", "progress=false"),
                   f"no space left on the device of {run}", "the last complete checkpoint, step 20, is intact")
    assert "--resume" in line
    assert checkpoint_names(run) == before and not leftovers(run)
    filler.unlink()
    code, _, err = pgm_main("train", "--resume", "--out", run, "max_steps=22", "progress=false")
    assert code == 0, err
    reference = tmp_path / "reference"
    shutil.copytree(text_run, reference)
    code, _, err = pgm_main("train", "--resume", "--out", reference, "max_steps=22", "progress=false")
    assert code == 0, err
    resumed = load_file(run / "checkpoints/step_0000022/model.safetensors")
    uninterrupted = load_file(reference / "checkpoints/step_0000022/model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)


def test_a_full_disk_reported_by_the_weights_writer_is_one_sentence(run, pgm_main, monkeypatch):
    """Where no tmpfs can be mounted: the lowest write we can reach (safetensors writes from Rust) fails as
    safetensors fails on a full disk."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # what it wrote before the disk filled
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    before = checkpoint_names(run)
    refusal(pgm_main(*command("resume", run)), f"no space left on the device of {run}",
            "the last complete checkpoint, step 20, is intact")
    assert checkpoint_names(run) == before and not leftovers(run)


@pytest.fixture
def pids():
    """(a live process's PID, a finished one's)."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    yield live.pid, int(finished.stdout)
    live.kill()
    live.wait()


def test_a_run_that_writes_removes_what_dead_writers_left_and_keeps_what_live_ones_write(run, pgm_main, pids):
    live, dead = pids
    stale = [run / f".loss.tmp-{dead}.png", run / f".metrics.tmp-{os.getpid()}.jsonl",
             run / "checkpoints" / f".tmp-step_0000030-{dead}"]
    kept = [run / f".config.tmp-{live}.json", run / "checkpoints" / f".tmp-step_0000040-{live}",
            run / ".loss.tmp-notapid.png", run / "checkpoints" / "step_0000020" / "state.json"]
    for path in stale[:2] + kept[:1] + kept[2:3]:
        path.write_bytes(b"partial")
    for directory in (stale[2], kept[1]):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"partial")
    code, _, err = pgm_main(*command("resume", run))
    assert code == 0, err
    assert [path for path in stale if path.exists()] == []
    assert [path for path in kept if not path.exists()] == []


def test_remove_partial_clears_a_killed_writers_file_and_directory(tmp_path, pids):
    live, dead = pids
    (tmp_path / f".optimizer.tmp-{dead}.pt").write_bytes(b"x")
    (tmp_path / f".tmp-tokenizer-{dead}").mkdir()
    (tmp_path / f".model.tmp-{live}.safetensors").write_bytes(b"x")
    (tmp_path / "optimizer.pt").write_bytes(b"x")
    remove_partial(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [f".model.tmp-{live}.safetensors", "optimizer.pt"]


# --- class 9: the modes of a run's files ---------------------------------------------------------

@pytest.mark.parametrize("umask,file_mode,directory_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_every_file_of_a_fresh_run_has_the_umasks_mode(tmp_path, umask, file_mode, directory_mode):
    from conftest import tiny_config

    from pgm.train import train

    previous = os.umask(umask)
    try:
        run_dir = tmp_path / "run"
        train(tiny_config(max_steps=2, save_every=1, eval_every=2), run_dir, log=lambda *a: None)
    finally:
        os.umask(previous)
    modes = {path.relative_to(run_dir).as_posix(): path.stat().st_mode & 0o777 for path in run_dir.rglob("*")}
    assert {"checkpoints/step_0000002/model.safetensors", "checkpoints/step_0000002/ema.safetensors",
            "loss.png", "config.json"} <= set(modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (directory_mode if (run_dir / name).is_dir() else file_mode)}
    assert wrong == {}


@pytest.mark.parametrize("umask,file_mode", [(0o022, 0o644), (0o077, 0o600)])
def test_weights_written_alone_have_the_umasks_mode(tmp_path, umask, file_mode):
    """Outside a checkpoint's directory too (`pgm consolidate` writes beside the shards): safetensors makes
    its file 0600 whatever the umask."""
    previous = os.umask(umask)
    try:
        formats.save_weights({"weight": torch.ones(2)}, tmp_path / "model.safetensors")
    finally:
        os.umask(previous)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == file_mode
