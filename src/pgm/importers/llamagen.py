"""LlamaGen's released VQ checkpoints (VQ-8: `vq_ds8_c2i.pt`), loaded strictly into our `VQModel`,
whose module tree and parameter names are LlamaGen's."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..models.vq import VQConfig, VQModel
from .unpickling import CheckpointImportError


def first_clause(text: str) -> str:
    """The first line of `text` up to its first full stop, to quote inside one sentence."""
    return text.strip().splitlines()[0].split(". ")[0].rstrip(".") if text.strip() else "no details"


def describe(value) -> str:
    """A state_dict value's shape as text, or its type when it is not a tensor."""
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def load_llamagen_vq(path: str | Path, config: VQConfig | None = None) -> VQModel:
    """A `VQModel` (in eval mode) holding the weights of a LlamaGen VQ checkpoint: a file holding
    {"model": state_dict, ...}. `config` defaults to VQ-8; the load is strict."""
    config = VQConfig() if config is None else config
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # a missing or unreadable file keeps its own error
        raise
    except pickle.UnpicklingError as error:
        # torch's message is several paragraphs; the cause follows this marker.
        reason = str(error).split("WeightsUnpickler error: ")[-1]
        raise CheckpointImportError(f"{path} is not a plain LlamaGen VQ checkpoint of tensors and containers "
                                    f"({first_clause(reason)})") from None
    except Exception as error:  # torch.load fails on foreign files with many exception types
        raise CheckpointImportError(f"{path} is not a PyTorch checkpoint "
                                    f"({type(error).__name__}: {first_clause(str(error))})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointImportError(f"{path} is not a LlamaGen VQ checkpoint: expected a dict with a 'model' "
                                    f"state_dict, found {found}")
    state = checkpoint["model"]
    # Built without storage or random initialisation: the strict load below fills every tensor.
    with torch.device("meta"):
        model = VQModel(config)
    expected = model.state_dict()
    problems = []
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    misshaped = [f"{name} (file {describe(state[name])}, model {describe(tensor)})"
                 for name, tensor in expected.items() if name in state and describe(state[name]) != describe(tensor)]
    for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            problems.append(f"{len(names)} {label} key(s): {', '.join(names[:3])}{more}")
    if problems:
        raise CheckpointImportError(f"{path} does not fit this VQ configuration: {'; '.join(problems)}")
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    return model.eval()
