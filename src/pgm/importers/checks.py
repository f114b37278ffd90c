"""What every importer does with a state_dict read from someone else's file: strip the prefixes
that wrappers add, count numbered blocks, read a shape, and check every tensor against the model
it must fill, naming what is missing, unexpected or mis-shaped."""

from __future__ import annotations

import re

import torch

from ..errors import CheckpointError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def strip_prefixes(state: dict) -> dict:
    """`state` with the DDP and torch.compile prefixes removed from its keys (in any order)."""
    stripped = {}
    for key, value in state.items():
        name = str(key)
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        stripped[name] = value
    return stripped


def count_blocks(state: dict, prefix: str) -> int:
    indices = {int(m.group(1)) for key in state if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.", key))}
    if indices != set(range(len(indices))):
        raise CheckpointError(f"the checkpoint's {prefix} are not numbered 0..{len(indices) - 1}: "
                              f"{sorted(indices)}")
    return len(indices)


def shape_of(state: dict, key: str) -> torch.Size:
    if key not in state:
        raise CheckpointError(f"the checkpoint has no tensor {key!r}")
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"the checkpoint's {key!r} is a {type(value).__name__}, not a tensor")
    return value.shape


def describe(value) -> str:
    """A state_dict value's shape as text, or its type when it is not a tensor."""
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def float32(state: dict) -> dict:
    """Floating-point tensors in float32 (released files may hold bf16 ones), the rest as they are."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def check_tensors(found: dict, expected: dict, where: str) -> None:
    """Refuse `found` unless it holds exactly the tensors of `expected`, with their shapes; the
    sentence names up to three of each kind of problem."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    misshaped = [f"{name} (file {describe(found[name])}, model {describe(tensor)})"
                 for name, tensor in expected.items() if name in found and describe(found[name]) != describe(tensor)]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            problems.append(f"{len(names)} {label} tensor(s): {', '.join(names[:3])}{more}")
    if problems:
        raise CheckpointError(f"{where} does not fit the model: {'; '.join(problems)}")
