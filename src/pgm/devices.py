"""Which device a command runs on and in which precision: float32 on a CPU (bf16 matmuls there
are hundreds of times slower), bf16 autocast on a GPU. Models never choose either; every
command that runs one asks here."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from .errors import ArgumentError

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" (a GPU when there is one, else the CPU), "cpu", "cuda" or "cuda:N", checked: a
    device this machine does not have is one sentence, not an assertion deep inside PyTorch."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ArgumentError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            reason = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise ArgumentError(f"device {name!r} asks for a GPU, but {reason}: use the device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ArgumentError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ArgumentError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def process_device(name: str | torch.device = "auto") -> torch.device:
    """`resolve_device`, with a bare "cuda" (or "auto" on a GPU machine) taken to mean this process's
    GPU when torchrun started several (LOCAL_RANK)."""
    import os

    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def uses_bf16(device: torch.device, precision: Precision = "auto") -> bool:
    if precision not in PRECISIONS:
        raise ArgumentError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: Precision = "auto") -> contextlib.AbstractContextManager:
    """A fresh context manager to run a model under: bf16 autocast, or nothing (float32)."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe_precision(device: torch.device, precision: Precision = "auto") -> str:
    return "bf16 autocast" if uses_bf16(device, precision) else "float32"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
