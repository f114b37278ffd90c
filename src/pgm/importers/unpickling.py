"""Reading `torch.save` archives without executing anything pickled in them.

The authors' checkpoints pickle OmegaConf configs and Hugging Face tokenizers beside their
tensors. The restricted unpickler lets tensors and plain containers through and turns every
other class into an inert `Stub` that only records what the pickle stream said about it; the
config values are then recovered from the stubs of OmegaConf nodes (`to_plain`, `lookup`).
"""

from __future__ import annotations

import _compat_pickle
import pickle
import re
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError


class Stub:
    """Stands in for any class the unpickler does not allow. It records constructor arguments
    (REDUCE / NEWOBJ), the state given to BUILD, and items appended or set on it."""

    module = ""
    name = ""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__.update(stub_args=args, stub_kwargs=kwargs, stub_state=None, stub_items={}, stub_list=[])
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["stub_state"] = state

    def __setitem__(self, key, value):
        self.stub_items[key] = value

    def append(self, value):
        self.stub_list.append(value)

    def extend(self, values):
        self.stub_list.extend(values)

    def __repr__(self) -> str:
        return f"<stub {self.module}.{self.name}>"


_STUBS: dict[tuple[str, str], type] = {}


def stub_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STUBS:
        _STUBS[key] = type(f"Stub_{name}", (Stub,), {"module": module, "name": name})
    return _STUBS[key]


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch", "Tensor"): torch.Tensor,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "dict"): dict,
    ("builtins", "list"): list, ("builtins", "tuple"): tuple, ("builtins", "int"): int, ("builtins", "float"): float,
    ("builtins", "bool"): bool, ("builtins", "str"): str, ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray, ("builtins", "complex"): complex, ("builtins", "slice"): slice,
}


def _allowed_global(module: str, name: str):
    if (module, name) in _ALLOWED:
        return _ALLOWED[(module, name)]
    if module == "_codecs" and name == "encode":  # how protocol 2 spells bytes
        return lambda text, encoding="utf-8": text.encode(encoding)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return None


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Protocol 2 streams name Python 2 modules (__builtin__, long, unicode): map them first.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = _allowed_global(module, name)
        return allowed if allowed is not None else stub_class(module, name)


restricted_pickle = types.ModuleType("pgm_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()
restricted_pickle.__name__ = "pgm_restricted_pickle"


def load_restricted(path: Path) -> Any:
    """torch.load with the restricted unpickler, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a torch.save zip archive)")
    try:
        return torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except Exception as error:  # a damaged archive or stream: say so in one sentence
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint ({type(error).__name__}: "
                              f"{error})") from None


def to_plain(value: Any) -> Any:
    """OmegaConf stubs -> plain dicts, lists and values; other stubs -> '<module.Name>' strings."""
    if isinstance(value, Stub):
        state = value.stub_state if isinstance(value.stub_state, dict) else {}
        if value.module.startswith("omegaconf") and "_content" in state:
            return to_plain(state["_content"])
        if value.module.startswith("omegaconf.nodes") and "_val" in state:
            return to_plain(state["_val"])
        return f"<{value.module}.{value.name}>"
    if isinstance(value, dict):
        return {to_plain(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


_INTERPOLATION = re.compile(r"^\$\{([A-Za-z0-9_.]+)\}$")


def lookup(config: dict, dotted: str, default=None):
    """`config["a"]["b"]` for "a.b", following simple `${a.b}` interpolations; never evaluates
    resolver expressions."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    for _ in range(10):
        match = _INTERPOLATION.match(node) if isinstance(node, str) else None
        if not match:
            break
        node = lookup(config, match.group(1), default)
    if isinstance(node, str) and node.startswith("${"):
        return default
    return node
