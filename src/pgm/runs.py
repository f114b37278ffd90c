"""A run is a directory:

    RUN/config.json                    the full resolved configuration (model, data, train)
    RUN/tokenizer/                     the tokenizer the data was encoded with
    RUN/data/                          the encoded rows (train.bin, val.bin) and meta.json
    RUN/checkpoints/step_0001200/      model.safetensors, ema.safetensors, optimizer.pt, state.json
    RUN/metrics.jsonl, RUN/loss.png    what happened

Checkpoints are written into a hidden temporary directory and renamed into place, so a
checkpoint directory either is complete or does not exist; a crash mid-save leaves only a
temporary directory that the next start removes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import Config, ConfigError
from .data import DataConfig
from .models import ModelConfig, config_from_dict
from .train_config import TrainConfig

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


class RunError(ValueError):
    """A run directory that is missing, not a run, or damaged."""


@dataclasses.dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig

    SECTIONS = ("model", "data", "train")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in self.SECTIONS}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        unknown = sorted(set(values) - set(cls.SECTIONS))
        if unknown:
            raise ConfigError(f"unknown configuration section(s): {', '.join(unknown)}")
        if "model" not in values:
            raise ConfigError("the configuration has no model section")
        builders = {"model": config_from_dict, "data": DataConfig.from_dict, "train": TrainConfig.from_dict}
        sections = {}
        for name, build in builders.items():
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

    def _locate(self, key: str, values: dict) -> tuple[str, str]:
        if "." in key:
            section, field = key.split(".", 1)
            if section not in self.SECTIONS:
                raise ConfigError(f"unknown setting {key!r}: sections are {', '.join(self.SECTIONS)}")
            if field not in values[section]:
                raise ConfigError(f"unknown setting {key!r}; {section} has: {', '.join(values[section])}")
            return section, field
        owners = [section for section in self.SECTIONS if key in values[section] and key != "kind"]
        if not owners:
            raise ConfigError(f"unknown setting {key!r}")
        if len(owners) > 1:
            raise ConfigError(f"{key!r} is ambiguous: write {' or '.join(f'{s}.{key}' for s in owners)}")
        return owners[0], key


def write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_config_file(directory: Path, missing: str = "not a run directory") -> dict:
    """The parsed config.json of `directory`, or one sentence saying why there is none."""
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise RunError(f"{directory} does not exist")
    if not path.is_file():
        raise RunError(f"{directory} is {missing} (it has no {CONFIG_FILE})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise RunError(f"{path} is not valid JSON") from None


def read_run_config(run_dir: Path) -> RunConfig:
    return RunConfig.from_dict(read_config_file(run_dir))


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
    root = run_dir / CHECKPOINTS
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".tmp-"):
                shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, model_state: dict, ema_state: dict | None, optimizer_state: dict,
                    state: dict, keep: int) -> Path:
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    temporary = root / f".tmp-step_{step:07d}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_file(_contiguous(model_state), str(temporary / "model.safetensors"))
    if ema_state is not None:
        save_file(_contiguous(ema_state), str(temporary / "ema.safetensors"))
    torch.save(optimizer_state, temporary / "optimizer.pt")
    (temporary / "state.json").write_text(json.dumps(state, indent=2))
    for file in temporary.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(temporary, final)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise RunError(f"{path} is truncated or corrupt ({error}); delete its checkpoint directory "
                       "to fall back to the previous one") from None


def load_checkpoint(checkpoint: Path, optimizer: bool = True) -> dict:
    out = {"model": load_weights(checkpoint / "model.safetensors")}
    ema = checkpoint / "ema.safetensors"
    out["ema"] = load_weights(ema) if ema.is_file() else None
    try:
        out["state"] = json.loads((checkpoint / "state.json").read_text())
        if optimizer:
            out["optimizer"] = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    except (OSError, json.JSONDecodeError, RuntimeError, EOFError) as error:
        raise RunError(f"checkpoint {checkpoint} is truncated or corrupt ({error})") from None
    return out


__all__ = ["RunConfig", "RunError", "Config", "read_run_config", "latest_checkpoint", "save_checkpoint",
           "load_checkpoint", "write_atomic"]
