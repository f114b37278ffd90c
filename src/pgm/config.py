"""Typed configurations: dataclasses that check their field types, validate their relations,
round-trip through JSON and accept `key=value` overrides from the command line."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, ClassVar

from .errors import ConfigError


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return value
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
    elif annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        value = float(value)
    elif annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
    elif annotation == list[int]:
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ConfigError(f"{name} must be a list of integers, got {value!r}")
        value = list(value)
    return value


@dataclasses.dataclass
class Config:
    """Base class: field types are checked at construction, `validate` adds the relations."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            setattr(self, field.name, _check_type(field.name, getattr(self, field.name), hints[field.name]))
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        if not isinstance(values, dict):
            raise ConfigError(f"settings must be a JSON object of field: value pairs, got a {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes):
        return type(self).from_dict({**self.to_dict(), **changes})

    @classmethod
    def parse_value(cls, name: str, text: str) -> Any:
        """Turn the command-line text of field `name` into a value of the field's type."""
        hints = typing.get_type_hints(cls)
        if name not in hints:
            raise ConfigError(f"unknown {cls.__name__} field {name!r}")
        annotation = hints[name]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            if text.lower() in ("none", "null"):
                return None
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        try:
            if annotation is bool:
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return lowered in ("true", "1", "yes")
            if annotation is int:
                return int(text)
            if annotation is float:
                return float(text)
            if annotation == list[int]:
                return [int(item) for item in text.split(",")]
        except ValueError:
            kind = {bool: "true or false", int: "an integer", float: "a number",
                    list[int]: "comma-separated integers such as 1,2,2,4"}[annotation]
            raise ConfigError(f"{name} must be {kind}, got {text!r}") from None
        return text


@dataclasses.dataclass
class ModelConfig(Config):
    """A model's configuration; `kind` names the model class it builds."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if k != "kind"}
        return super().from_dict(values)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
