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
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError
from .data import DataConfig, data_directory, prepared_meta
from .formats import (load_weights, read_config_file, remove_partial, replaced_atomically, replaced_directory,
                      save_weights, write_atomic)
from .models import ModelConfig, config_from_dict
from .sharding import SHARDED_DIR, read_sharded
from .train_config import DistillConfig, TrainConfig

CHECKPOINTS = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
METRICS_FILE = "metrics.jsonl"


class RunError(ValueError):
    """A run directory that is missing, not a run, or damaged."""


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
        values = self.to_dict()
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            if not sep or not key:
                raise ConfigError(f"expected key=value, got {assignment!r}")
            section, field = self._locate(key, values)
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
    return RunConfig.from_dict(read_config_file(run_dir, "a run directory"))


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
    final.parent.mkdir(parents=True, exist_ok=True)
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
    final.parent.mkdir(parents=True, exist_ok=True)
    with replaced_directory(final) as temporary:
        dist.broadcast_object_list([str(temporary)])
        write_shards(temporary / SHARDED_DIR)  # returns once every process's shards are written
        (temporary / "state.json").write_text(json.dumps(state, indent=2))
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / SHARDED_DIR).is_dir() and not (checkpoint / "model.safetensors").is_file()


def load_checkpoint(checkpoint: Path, optimizer: bool = True) -> dict:
    """model, ema (None when the run kept no average), state; to resume (`optimizer`), also the
    optimizer and extra: the other weights `save_checkpoint` was given, by name. A sharded
    checkpoint is read whole, in this process."""
    if is_sharded(checkpoint):
        try:
            out = read_sharded(checkpoint / SHARDED_DIR, read_run_config(checkpoint.parent.parent).model, optimizer)
        except (OSError, RuntimeError, ValueError, KeyError) as error:
            raise RunError(f"checkpoint {checkpoint} is truncated or corrupt ({error})") from None
        out["extra"] = {}
    else:
        out = {"model": load_weights(checkpoint / "model.safetensors")}
        ema = checkpoint / "ema.safetensors"
        out["ema"] = load_weights(ema) if ema.is_file() else None
        if optimizer:
            out["extra"] = {path.stem: load_weights(path) for path in sorted(checkpoint.glob("*.safetensors"))
                            if path.stem not in ("model", "ema")}
    out["state"] = read_checkpoint_state(checkpoint)
    if optimizer and "optimizer" not in out:
        try:
            out["optimizer"] = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        except (OSError, RuntimeError, EOFError) as error:
            raise RunError(f"checkpoint {checkpoint} is truncated or corrupt ({error})") from None
    return out


def read_checkpoint_state(checkpoint: Path) -> dict:
    """A checkpoint's state.json: its step and what the trainer recorded with it."""
    try:
        return json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RunError(f"checkpoint {checkpoint} is truncated or corrupt ({error})") from None


def consolidate_checkpoint(checkpoint: Path) -> Path:
    """Write a sharded checkpoint's model.safetensors, ema.safetensors and optimizer.pt beside
    its shards, so that it reads like any checkpoint (model.safetensors last: until it exists the
    checkpoint still reads as sharded)."""
    if not is_sharded(checkpoint):
        raise RunError(f"{checkpoint} is not a sharded checkpoint (it has no {SHARDED_DIR}/ directory, or is "
                       "consolidated already)")
    loaded = load_checkpoint(checkpoint)
    with replaced_atomically(checkpoint / "optimizer.pt") as temporary:
        torch.save(loaded["optimizer"], temporary)
    if loaded["ema"] is not None:
        save_weights(loaded["ema"], checkpoint / "ema.safetensors")
    save_weights(loaded["model"], checkpoint / "model.safetensors")
    return checkpoint


class MetricsLog:
    """RUN/metrics.jsonl: one JSON record per line, each with the step it describes."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Forget what a crashed run logged after its last checkpoint (a torn last line included)."""
        if self.enabled and self.path.is_file():
            kept = [record for record in self.records() if record["step"] <= step]
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
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
        return records


def run_card(run_dir: Path, checkpoint: Path, weights: str) -> dict:
    """What a model card says about the model of `checkpoint`: its data, the tokens it has seen,
    its last validation number and where its weights came from."""
    config = read_run_config(run_dir)
    state = json.loads((checkpoint / "state.json").read_text())
    step = state["step"]
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
    validated = [r for r in MetricsLog(run_dir / METRICS_FILE).records() if "val_nll" in r and r["step"] <= step]
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

