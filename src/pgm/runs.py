"""A run is a directory:

    RUN/config.json                    the full resolved configuration (model, data, train)
    RUN/tokenizer/                     the tokenizer the data was encoded with
    RUN/data/                          the encoded rows (shards of train and val) and meta.json; none
                                       when the run trains on a prepared data directory (data.prepared)
    RUN/checkpoints/step_0001200/      model.safetensors, ema.safetensors, optimizer.pt, state.json
                                       (a sharded run: sharded/ and state.json, see `pgm.sharding`)
    RUN/metrics.jsonl, RUN/loss.png    what happened
    RUN/tensorboard/, RUN/wandb/       the same, for a logger (train.logger; see `pgm.tracking`)

Checkpoints are written into a hidden temporary directory and renamed into place
(`pgm.formats.replaced_directory`), so a checkpoint directory either is complete or does not
exist; a crash mid-save leaves only a temporary directory that the next start removes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from .data import DataConfig, data_directory, prepared_meta
from .errors import ConfigError, ResourceError, RunError
from .formats import (CONFIG_FILE, load_weights, make_directory, out_of_space, read_config_file, remove_partial,
                      replaced_atomically, replaced_directory, save_weights, write_atomic)
from .models import ModelConfig, config_from_dict
from .sharding import SHARDED_DIR, read_sharded
from .train_config import DistillConfig, TrainConfig

CHECKPOINTS = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass
class RunConfig:
    """model, data and train; a distillation run (`pgm distill`) also has its distill section."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    distill: DistillConfig | None = None

    SECTIONS = ("model", "data", "train", "distill")

    @property
    def sections(self) -> tuple[str, ...]:
        return tuple(name for name in self.SECTIONS if getattr(self, name) is not None)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in self.sections}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        if not isinstance(values, dict):
            raise ConfigError("a run configuration is a JSON object with model, data and train sections, "
                              f"not a {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.SECTIONS))
        if unknown:
            raise ConfigError(f"unknown configuration section(s): {', '.join(unknown)}")
        if "model" not in values:
            raise ConfigError("the configuration has no model section")
        builders = {"model": config_from_dict, "data": DataConfig.from_dict, "train": TrainConfig.from_dict,
                    "distill": DistillConfig.from_dict}
        sections = {}
        for name, build in builders.items():
            if name == "distill" and name not in values:
                continue
            try:
                sections[name] = build(values.get(name, {}))
            except ConfigError as error:
                raise ConfigError(f"{name} settings: {error}") from None
        return cls(**sections)

    def with_overrides(self, assignments: list[str]) -> "RunConfig":
        """Apply `section.field=value` (or `field=value` when the field name is unambiguous)."""
        values, given = self.to_dict(), set()
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            if not sep or not key:
                raise ConfigError(f"expected key=value, got {assignment!r}")
            section, field = self._locate(key, values)
            if (section, field) in given:
                raise ConfigError(f"{section}.{field} is set twice; give it once")
            given.add((section, field))
            config_class = type(getattr(self, section))
            if field == "kind":
                raise ConfigError("the model kind comes from the preset or config file; it cannot be overridden")
            try:
                values[section][field] = config_class.parse_value(field, text)
            except ConfigError as error:
                raise ConfigError(f"{section}.{error}") from None
        return RunConfig.from_dict(values)

    def locate(self, key: str) -> tuple[str, str]:
        """(section, field) of a setting written `section.field` or, when unambiguous, `field`."""
        return self._locate(key, self.to_dict())

    def _locate(self, key: str, values: dict) -> tuple[str, str]:
        if "." in key:
            section, field = key.split(".", 1)
            if section not in self.sections:
                raise ConfigError(f"unknown setting {key!r}: sections are {', '.join(self.sections)}")
            if field not in values[section]:
                raise ConfigError(f"unknown setting {key!r}; {section} has: {', '.join(values[section])}")
            return section, field
        owners = [section for section in self.sections if key in values[section] and key != "kind"]
        if not owners:
            raise ConfigError(f"unknown setting {key!r}")
        if len(owners) > 1:
            raise ConfigError(f"{key!r} is ambiguous: write {' or '.join(f'{s}.{key}' for s in owners)}")
        return owners[0], key


def read_run_config(run_dir: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(read_config_file(run_dir, "a run directory"))
    except ConfigError as error:  # a saved configuration that no longer reads: say which file
        raise ConfigError(f"{run_dir / CONFIG_FILE} is damaged: {error}") from None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def remove_partial_checkpoints(run_dir: Path) -> None:
    remove_partial(run_dir / CHECKPOINTS)


def save_checkpoint(run_dir: Path, step: int, model_state: dict, ema_state: dict | None, optimizer_state: dict,
                    state: dict, keep: int, extra: dict[str, dict] | None = None) -> Path:
    """Write checkpoints/step_N (complete or not at all) and keep only the last `keep`. `extra`:
    more weights by name (NAME.safetensors), such as a distillation's teacher."""
    final = run_dir / CHECKPOINTS / f"step_{step:07d}"
    make_directory(final.parent)
    with replaced_directory(final) as temporary:
        save_weights(model_state, temporary / "model.safetensors")
        if ema_state is not None:
            save_weights(ema_state, temporary / "ema.safetensors")
        for name, weights in (extra or {}).items():
            save_weights(weights, temporary / f"{name}.safetensors")
        torch.save(optimizer_state, temporary / "optimizer.pt")
        (temporary / "state.json").write_text(json.dumps(state, indent=2))
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_sharded_checkpoint(run_dir: Path, step: int, write_shards, state: dict, keep: int) -> Path:
    """Collective: checkpoints/step_N of a sharded run (complete or not at all), where every
    process's `write_shards(directory)` writes its shards; the main process then adds state.json,
    renames it into place and keeps only the last `keep`."""
    import torch.distributed as dist

    final = run_dir / CHECKPOINTS / f"step_{step:07d}"
    if dist.get_rank() != 0:
        shared = [None]
        dist.broadcast_object_list(shared)
        write_shards(Path(shared[0]) / SHARDED_DIR)
        return final
    make_directory(final.parent)
    with replaced_directory(final) as temporary:
        dist.broadcast_object_list([str(temporary)])
        write_shards(temporary / SHARDED_DIR)  # returns once every process's shards are written
        (temporary / "state.json").write_text(json.dumps(state, indent=2))
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / SHARDED_DIR).is_dir() and not (checkpoint / "model.safetensors").is_file()


def checkpoint_step(checkpoint: Path) -> int | None:
    """The step a checkpoint directory's name says (step_0001200: 1200); None for another name."""
    found = CHECKPOINT_PATTERN.match(checkpoint.name)
    return int(found.group(1)) if found else None


def fallback(checkpoint: Path, resuming: bool) -> str:
    """What still works when a file of `checkpoint` is damaged: the run's checkpoint before it
    (which deleting this one falls back to), or a new start."""
    step = checkpoint_step(checkpoint)
    earlier = [path for path in checkpoint_dirs(checkpoint.parent.parent) if step is not None and
               checkpoint_step(path) < step]
    if earlier:
        return f"delete {checkpoint} to fall back to the checkpoint of step {checkpoint_step(earlier[-1])}"
    return ("it is the run's only checkpoint: start the run anew in another directory" if resuming
            else "it is the run's only checkpoint")


def _damaged(path: Path, reason: str, still_works: str) -> RunError:
    return RunError(f"{path} is truncated or corrupt ({reason}); {still_works}")


def _first_line(error: BaseException) -> str:
    """The first sentence of what a reader raised (torch's run on for a paragraph)."""
    if isinstance(error, pickle.UnpicklingError):
        return "it asks to build objects other than tensors, which is refused: a foreign or tampered file"
    text = str(error).strip()
    first = text.splitlines()[0].split(". ")[0] if text else type(error).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def load_checkpoint(checkpoint: Path, optimizer: bool = True) -> dict:
    """model, ema (None when the run kept no average), state; to resume (`optimizer`), also the
    optimizer and extra: the other weights `save_checkpoint` was given, by name. A sharded
    checkpoint is read whole, in this process. Every file is checked first (state.json before the
    weights), and a damaged one named with what still works."""
    state = read_checkpoint_state(checkpoint)
    if is_sharded(checkpoint):
        out = _read_sharded_checkpoint(checkpoint, optimizer)
        out["extra"] = {}
    else:
        still_works = fallback(checkpoint, resuming=True)
        out = {"model": load_weights(checkpoint / "model.safetensors", still_works)}
        ema = checkpoint / "ema.safetensors"
        out["ema"] = load_weights(ema, still_works) if ema.is_file() else None
        if optimizer:
            out["extra"] = {path.stem: load_weights(path, still_works)
                            for path in sorted(checkpoint.glob("*.safetensors")) if path.stem not in ("model", "ema")}
    out["state"] = state
    if optimizer and "optimizer" not in out:
        out["optimizer"] = read_optimizer_state(checkpoint)
    return out


def _read_sharded_checkpoint(checkpoint: Path, optimizer: bool) -> dict:
    try:
        return read_sharded(checkpoint / SHARDED_DIR, read_run_config(checkpoint.parent.parent).model, optimizer)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise _damaged(checkpoint / SHARDED_DIR, _first_line(error), fallback(checkpoint, optimizer)) from None


def checkpoint_weights(checkpoint: Path, weights: str | None) -> tuple[dict, bool]:
    """(state dict, whether it is the average) of the weights a model loaded from `checkpoint` uses:
    `weights` "ema" or "raw", None for the average when the run kept one. Only that file is read,
    so a damaged other one stands in no one's way (and is named when it is the one asked for)."""
    read_checkpoint_state(checkpoint)  # what the model card reads: checked before any weights
    ema = checkpoint / "ema.safetensors"
    if is_sharded(checkpoint):
        loaded = _read_sharded_checkpoint(checkpoint, optimizer=False)
        has_average = loaded["ema"] is not None
    else:
        loaded, has_average = None, ema.is_file()
    if weights == "ema" and not has_average:
        raise RunError(f"{checkpoint.parent.parent} kept no average of its weights (train.ema=0): use the raw weights")
    averaged = weights != "raw" and has_average
    if loaded is not None:
        return loaded["ema" if averaged else "model"], averaged
    other = "--weights raw" if averaged else "--weights ema" if has_average else ""
    instead = f"{other} reads the other weights, or {fallback(checkpoint, False)}" if other else fallback(checkpoint, False)
    return load_weights(ema if averaged else checkpoint / "model.safetensors", instead), averaged


def read_optimizer_state(checkpoint: Path) -> dict:
    """A checkpoint's optimizer.pt, read without executing anything pickled and checked to be an
    optimizer's state dict (what resuming needs; sampling never reads it)."""
    path = checkpoint / "optimizer.pt"
    still_works = f"sampling and evaluation still read its weights; to resume, {fallback(checkpoint, True)}"
    if not path.is_file():
        raise RunError(f"{path} does not exist; {still_works}")
    try:
        with warnings.catch_warnings():  # torch's advice on a foreign file's pickle protocol: the file is judged below
            warnings.simplefilter("ignore")
            value = torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever a damaged or foreign file makes torch.load raise, it is the file
        raise _damaged(path, _first_line(error), still_works) from None
    groups = value.get("param_groups") if isinstance(value, dict) else None
    if not (isinstance(value, dict) and isinstance(value.get("state"), dict) and isinstance(groups, list)
            and all(isinstance(group, dict) and isinstance(group.get("params"), list) for group in groups)):
        raise _damaged(path, "not an optimizer's state: no state and param_groups", still_works)
    return value


def read_checkpoint_state(checkpoint: Path) -> dict:
    """A checkpoint's state.json: its step and what the trainer recorded with it, checked (an
    object whose step is the directory's; its counters whole numbers, its clock a number)."""
    path = checkpoint / "state.json"
    still_works = fallback(checkpoint, resuming=False)
    if not path.is_file():
        raise RunError(f"{path} {'is not a file' if path.exists() else 'does not exist'}; {still_works}")
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _damaged(path, _first_line(error), still_works) from None
    if not isinstance(state, dict):
        raise _damaged(path, f"a JSON {type(state).__name__}, not an object", still_works)
    counts = {key: state.get(key) for key in ("step", "ema_updates") if key in state or key == "step"}
    for key, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _damaged(path, f"its {key} is {json.dumps(value)}, not a whole number >= 0", still_works)
    if checkpoint_step(checkpoint) not in (None, state["step"]):
        raise _damaged(path, f"its step is {state['step']}, but its directory is step {checkpoint_step(checkpoint)}",
                       still_works)
    elapsed = state.get("elapsed_s", 0.0)
    if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool) or not math.isfinite(elapsed):
        raise _damaged(path, f"its elapsed_s is {json.dumps(elapsed)}, not a number", still_works)
    return state


def consolidate_checkpoint(checkpoint: Path) -> Path:
    """Write a sharded checkpoint's model.safetensors, ema.safetensors and optimizer.pt beside
    its shards, so that it reads like any checkpoint (model.safetensors last: until it exists the
    checkpoint still reads as sharded)."""
    if not is_sharded(checkpoint):
        raise RunError(f"{checkpoint} is not a sharded checkpoint (it has no {SHARDED_DIR}/ directory, or is "
                       "consolidated already)")
    remove_partial(checkpoint)  # what a killed consolidation left: its files are as big as the model
    loaded = load_checkpoint(checkpoint)
    try:
        with replaced_atomically(checkpoint / "optimizer.pt") as temporary:
            torch.save(loaded["optimizer"], temporary)
        if loaded["ema"] is not None:
            save_weights(loaded["ema"], checkpoint / "ema.safetensors")
        save_weights(loaded["model"], checkpoint / "model.safetensors")
    except Exception as error:
        if out_of_space(error):
            raise ResourceError(f"no space left on the device of {checkpoint} to consolidate it (its shards are intact "
                                "and still load)") from None
        raise
    return checkpoint


class MetricsLog:
    """RUN/metrics.jsonl: one JSON record per line, each with the step it describes."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Forget what a crashed run logged after its last checkpoint (a torn last line included)."""
        if self.enabled and self.path.is_file():
            kept = [record for record in self.records() if record["step"] <= step]  # unreadable lines go too
            write_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept).encode())

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        """The records, without a line that a killed process left half-written (or that a
        running one is writing now)."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_bytes().splitlines():  # bytes: one damaged line costs that line only
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                records.append(record)
        return records


def run_card(run_dir: Path, checkpoint: Path, weights: str) -> dict:
    """What a model card says about the model of `checkpoint`: its data, the tokens it has seen,
    its last validation number and where its weights came from."""
    config = read_run_config(run_dir)
    step = read_checkpoint_state(checkpoint)["step"]
    data = config.data
    described = ("source", "tokenizer") + (("image_size",) if data.is_image else ("packing",))
    card = {"data": {name: getattr(data, name) for name in described},
            "tokens_seen": step * config.train.batch_size * config.model.length,
            "weights": weights, "source": str(checkpoint)}
    if config.train.init_from:
        card["init_from"] = f"{config.train.init_from} ({config.train.init_weights} weights)"
    meta = prepared_meta(data_directory(run_dir, data))
    classes = meta.get("classes") if meta else None
    if classes:
        card["classes"] = classes
    validated = [r for r in MetricsLog(run_dir / METRICS_FILE).records() if r["step"] <= step
                 and isinstance(r.get("val_nll"), (int, float)) and not isinstance(r["val_nll"], bool)]
    if validated:
        name, unit = validation_metric(config.model)
        card["validation"] = {f"{name} {unit}": round(validated[-1]["val_nll"], 5), "step": validated[-1]["step"]}
    return card


def validation_metric(model_config) -> tuple[str, str]:
    """(name, unit) of what a run's validation number (`val_nll` in its metrics) measures."""
    if model_config.kind == "vq":
        return "MSE", "per pixel on [-1, 1]"
    if model_config.kind == "maskgit" or getattr(model_config, "num_classes", 0):
        return "cross-entropy", "nats/code"
    return ("NLL" if model_config.kind == "ar" else "ELBO"), "nats/token"


__all__ = ["RunConfig", "RunError", "MetricsLog", "read_run_config", "latest_checkpoint", "save_checkpoint",
           "load_checkpoint", "run_card"]

