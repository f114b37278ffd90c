"""Following a run in TensorBoard or W&B (`train.logger`): what each one's files hold is read back
with the logger's own reader (TensorBoard's event accumulator; W&B's offline run file, a LevelDB
log of protocol buffers) and compared with metrics.jsonl, step by step."""

import json
import shutil
import struct
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from pgm.data.tokenizers import load_tokenizer
from pgm.errors import RunError
from pgm.eval.perplexity import seed_for
from pgm.generation import decode_samples, iterate_text, known_from_text
from pgm.hub import load_pretrained_dir
from pgm.runs import read_run_config
from pgm.sampling.common import run_to_end
from pgm.sampling.settings import SamplerSettings
from pgm.tracking import SAMPLE_RULE, WANDB_ID_FILE, Tracker, tracker_for
from pgm.train import train
from pgm.train_config import TrainConfig

SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "val_nll", "val_ppl")


def quick(**train_overrides):
    """text-tiny for 4 steps, validated and saved every 2."""
    return tiny_config(**{"max_steps": 4, "eval_every": 2, "save_every": 2, "keep_checkpoints": 5, **train_overrides})


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged(run_dir: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) of `name` in metrics.jsonl."""
    return [(r["step"], r[name]) for r in records(run_dir) if name in r]


def test_tensorboard_event_files_hold_the_metrics_and_the_samples_at_their_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(quick(logger="tensorboard", log_samples=2), run_dir, log=lambda *a: None)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for name in SCALARS:
        found = [(e.step, e.value) for e in events.Scalars(name)]
        expected = logged(run_dir, name)
        assert [s for s, _ in found] == [s for s, _ in expected] and expected, name
        assert [v for _, v in found] == pytest.approx([v for _, v in expected], rel=1e-6), name
    assert [s for s, _ in logged(run_dir, "val_nll")] == [2, 4]
    assert "time" not in events.Tags()["scalars"]  # every event carries its own wall time

    # The samples of each validation: those of the averaged weights at that step, drawn again here
    samples = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("samples/text_summary")}
    assert sorted(samples) == [2, 4]
    model, _ = load_pretrained_dir(run_dir)  # the average of the last checkpoint, step 4
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    known_tokens, known_mask = known_from_text(tokenizer, length=32, max_length=32, copies=2)  # BOS, then 31 tokens
    tokens = run_to_end(iterate_text(model, known_tokens=known_tokens, known_mask=known_mask,
                                     settings=SamplerSettings(steps=8),
                                     generator=torch.Generator().manual_seed(seed_for(0, 4, 0, 3))))
    again = decode_samples(tokens, tokenizer, known_mask)
    assert len(again) == 2
    assert [textwrap.dedent(block) for block in samples[4].split(SAMPLE_RULE)] == again


def test_a_resumed_run_replaces_what_a_crash_logged_after_its_checkpoint_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(quick(logger="tensorboard", log_samples=0), run_dir, log=lambda *a: None)
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")  # as if killed after logging step 4, before saving it
    train(read_run_config(run_dir), run_dir, resume=True, log=lambda *a: None)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]  # steps 3 and 4 once, as replayed
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([v for _, v in logged(run_dir, "loss")], rel=1e-6)


def wandb_records(path: Path):
    """The protocol buffer records of a W&B run file: a 7-byte header (":W&B", magic, version),
    then LevelDB's log format (32 KiB blocks of chunks: checksum, length, type; FULL = 1 or
    FIRST, MIDDLE, LAST = 2, 3, 4)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def wandb_history(run_dir: Path) -> tuple[list[str], list[dict]]:
    """(the run id of each offline run directory, in order; every history row of them, in order)."""
    ids, rows = [], []
    for directory in sorted((run_dir / "wandb").glob("offline-run-*")):
        for record in wandb_records(next(directory.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.append(record.run.run_id)
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
                assert config["train"]["logger"] == "wandb" and config["model"]["kind"] == "pgm"
            elif kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return ids, rows


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """W&B offline and silent, everything it writes outside the run directory under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    for name in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)


def test_wandb_offline_run_holds_the_metrics_and_a_resume_continues_the_same_run(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    train(quick(logger="wandb", log_samples=3), run_dir, log=lambda *a: None)
    config = read_run_config(run_dir)
    train(config.with_overrides(["train.max_steps=6"]), run_dir, resume=True, log=lambda *a: None)

    ids, rows = wandb_history(run_dir)
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert ids == [run_id, run_id]  # two starts of the process, one W&B run
    for name in SCALARS:
        found = [(row["_step"], row[name]) for row in rows if name in row]
        # W&B keeps one value of a name per step: elapsed_s, in both records of a validation step, the later one's.
        # JSON both ways: the very same floats.
        assert found == list(dict(logged(run_dir, name)).items()) and found, name
    assert [row["_step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5, 6]
    tables = [(row["_step"], row["samples/nrows"]) for row in rows if row.get("samples/_type") == "table-file"]
    assert tables == [(2, 3), (4, 3), (6, 3)]


def test_metrics_records_carry_the_wall_clock_and_the_runs_own_clock_across_a_resume(tmp_path):
    run_dir = tmp_path / "run"
    started = time.time()
    train(quick(), run_dir, log=lambda *a: None)
    first = records(run_dir)
    state = json.loads((run_dir / "checkpoints" / "step_0000004" / "state.json").read_text())
    train(read_run_config(run_dir).with_overrides(["train.max_steps=6"]), run_dir, resume=True, log=lambda *a: None)
    ended = time.time()
    every = records(run_dir)
    assert every[:len(first)] == first
    assert all(started <= r["time"] <= ended for r in every)
    assert [r["time"] for r in every] == sorted(r["time"] for r in every)
    clock = [r["elapsed_s"] for r in every]
    assert clock == sorted(clock) and 0 < clock[0] < ended - started
    # The resumed process continues the clock from its checkpoint, not from zero
    assert first[-1]["elapsed_s"] <= state["elapsed_s"] < every[len(first)]["elapsed_s"]


@pytest.mark.parametrize("logger,hidden", [("tensorboard", ("tensorboard", "torch.utils.tensorboard")),
                                           ("wandb", ("wandb",))])
def test_a_missing_package_is_one_sentence_before_any_work(logger, hidden, tmp_path, monkeypatch, pgm_main):
    for module in hidden:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    run_dir = tmp_path / "run"
    code, out, err = pgm_main("train", "--preset", "text-tiny", "--out", run_dir, f"train.logger={logger}")
    assert code != 0
    assert err.strip().splitlines() == [f"pgm train: error: train.logger={logger} needs the {logger} package: "
                                        f"pip install 'partition-gm[{logger}]'"]
    assert not run_dir.exists()  # nothing was prepared
    assert type(tracker_for(TrainConfig(logger=logger), main=False)) is Tracker  # other processes do not need it


def test_an_unknown_logger_is_one_sentence(tmp_path, pgm_main):
    code, _, err = pgm_main("train", "--preset", "text-tiny", "--out", tmp_path / "run", "train.logger=mlflow")
    assert code == 2
    assert err.strip().splitlines() == ["pgm train: error: train settings: logger must be one of 'none', "
                                        "'tensorboard', 'wandb', got 'mlflow'"]


def test_samples_of_a_sharded_model_are_refused(tmp_path):
    with pytest.raises(RunError, match=r"^train.log_samples draws samples on the first process only, which a sharded "
                                       r"model \(train.parallel=fsdp\) cannot do: set train.log_samples=0$"):
        train(quick(logger="tensorboard", parallel="fsdp"), tmp_path / "run", log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_a_distillation_tracks_its_own_numbers_too(text_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pgm.distill import distill, distillation_config
    from pgm.presets import distill_preset

    run_dir = tmp_path / "student"
    config = distillation_config(text_run, *distill_preset("distill-tiny"),
                                 ["logger=tensorboard", "log_samples=1", "eval_every=3"])[0]
    distill(config, run_dir, log=lambda *a: None)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for name in ("val_divergence", "val_nll", "round", "student_steps", "loss"):
        found, expected = [(e.step, e.value) for e in events.Scalars(name)], logged(run_dir, name)
        assert [s for s, _ in found] == [s for s, _ in expected] and expected, name
        assert [v for _, v in found] == pytest.approx([v for _, v in expected], rel=1e-6), name
    assert [e.step for e in events.Tensors("samples/text_summary")] == [s for s, _ in logged(run_dir, "val_nll")]


def test_image_runs_log_a_grid_of_samples_and_a_vq_its_reconstructions(image_runs, tmp_path):
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pgm.data import data_directory, load_prepared
    from pgm.data.image_sets import to_unit_range
    from pgm.pictures import grid_picture
    from pgm.presets import preset
    from pgm.sampling import generate_codes
    from pgm.vq_tokenizer import load_vq_tokenizer

    def logged_images(run_dir: Path, tag: str) -> dict[int, np.ndarray]:
        events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
        events.Reload()
        return {e.step: np.asarray(Image.open(io.BytesIO(e.encoded_image_string))) for e in events.Images(tag)}

    vq_dir, maskgit_dir = tmp_path / "vq", tmp_path / "maskgit"
    tracked = ["train.logger=tensorboard", "train.log_samples=3"]
    shutil.copytree(image_runs / "vq", vq_dir)  # the session's vq-tiny run (8 steps), one step further with a logger
    train(read_run_config(vq_dir).with_overrides(["train.max_steps=9", *tracked]), vq_dir, resume=True,
          log=lambda *a: None)
    train(preset("maskgit-tiny").with_overrides([*tracked, f"data.tokenizer=vq:{image_runs / 'vq'}"]), maskgit_dir,
          log=lambda *a: None)

    # A VQ autoencoder: three validation images over their reconstructions, at its validation (step 9)
    vq, _ = load_pretrained_dir(vq_dir)
    pixels, _ = load_prepared(data_directory(vq_dir, read_run_config(vq_dir).data)).val[[0, 1, 2]]
    shown = logged_images(vq_dir, "reconstructions")
    assert list(shown) == [9]
    images = to_unit_range(pixels).view(3, 1, 32, 32)
    with torch.no_grad():
        expected = grid_picture(torch.cat([images, vq(images).reconstruction.clamp(-1, 1)]), columns=3)
    assert np.array_equal(shown[9][..., 0], np.asarray(expected))  # grey, shown as RGB

    # A class-conditional model: classes 0, 1, 2 in a row, sampled as at its validation (step 6)
    model, _ = load_pretrained_dir(maskgit_dir)
    codes = generate_codes(model, torch.tensor([0, 1, 2]), settings=SamplerSettings(steps=8),
                           generator=torch.Generator().manual_seed(seed_for(0, 6, 0, 3)))
    expected = grid_picture(load_vq_tokenizer(image_runs / "vq").decode(codes), columns=3)
    shown = logged_images(maskgit_dir, "samples")
    assert list(shown) == [6]
    assert shown[6].shape[:2] == (72, 208)  # one row of three 32-pixel images, padded, at twice their size
    assert np.array_equal(shown[6][..., 0], np.asarray(expected))
