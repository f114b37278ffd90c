"""FSDP2 training (`train.parallel=fsdp`): per-block sharding, activation checkpointing, and
sharded checkpoints through torch.distributed.checkpoint (DCP).

A sharded checkpoint is `RUN/checkpoints/step_N/sharded/` (every process writes its own shards
of the model, the weight average and the optimizer) beside `state.json`. DCP reshards on load,
so a run resumes on any number of processes; `read_sharded` reads one whole in a single process,
which is how a run is loaded for sampling, resumed without sharding, or consolidated into the
usual model.safetensors / ema.safetensors / optimizer.pt (`pgm consolidate`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .models import ModelConfig, build_model

SHARDED_DIR = "sharded"


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the members of the model's module lists (encoder and decoder blocks,
    DiT blocks, MaskGIT layers), the unit that is sharded and recomputed."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them. The
    block's own `forward` is wrapped (not the module), so parameter names do not change and
    FSDP's hooks stay outside the recomputation; dropout is replayed from the saved RNG state."""
    for block in repeated_blocks(model):
        forward = block.forward

        def recomputed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = recomputed


def shard(model: nn.Module, device: torch.device, world_size: int, bf16_parameters: bool) -> None:
    """FSDP2 in place: each block its own unit (its parameters gathered just for its forward
    and backward), then the rest at the root. `bf16_parameters`: compute in bf16 and reduce the
    gradients in float32 (GPU); the sharded master weights stay float32 either way."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_parameters
              else MixedPrecisionPolicy())
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
        for method in getattr(block, "ENTRY_POINTS", ()):
            register_fsdp_forward_method(block, method)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, average: dict[str, torch.Tensor] | None) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if average is not None:
        state["ema"] = average
    return state


def save_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                average: dict[str, torch.Tensor] | None) -> None:
    """Collective: every process writes its shards of the model, the optimizer and `average`
    (parameter name -> averaged tensor, sharded like the parameter) into `directory`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer, average), checkpoint_id=directory)


def load_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                average: dict[str, torch.Tensor] | None) -> None:
    """Collective: the inverse of `save_shards` (into `average`'s tensors in place), resharded to
    this run's processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state(model, optimizer, average)
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def distribute_whole(model: nn.Module, model_state: dict, optimizer: torch.optim.Optimizer | None = None,
                     optimizer_state: dict | None = None) -> None:
    """Collective: put an unsharded state (our model state dict and, given an optimizer, its
    torch state dict) into a sharded model and its optimizer; every process holds the whole state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=whole)
    if optimizer is not None:
        names = [name for name, _ in model.named_parameters()]
        by_name = {"state": {names[index]: value for index, value in optimizer_state["state"].items()},
                   "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                                    for group in optimizer_state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=whole)


def has_average(directory: Path) -> bool:
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return any(key.startswith("ema.") for key in saved)


def read_sharded(directory: Path, config: ModelConfig, optimizer: bool = True) -> dict:
    """A sharded checkpoint whole, in this process (no process group): model and ema as our
    state dicts (ema: the model's state with the averaged parameters, None if the run kept no
    average), and, with `optimizer`, the optimizer as a torch AdamW state dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = build_model(config)
    adam = torch.optim.AdamW(model.parameters())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    parameters = dict(model.named_parameters())
    state = {"model": model.state_dict()}
    if optimizer:
        state["optimizer"] = get_optimizer_state_dict(model, adam)
    averaged = has_average(directory)
    if averaged:
        state["ema"] = {name: parameters[name].detach().clone() for name in trainable}
    with warnings.catch_warnings():  # one process is what is meant, which DCP warns about
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=directory, no_dist=True)
    model.load_state_dict(state["model"])
    out = {"model": model.savable_state(), "ema": None}
    if averaged:
        out["ema"] = model.savable_state({**model.state_dict(), **state["ema"]})
    if optimizer:
        set_optimizer_state_dict(model, adam, state["optimizer"])
        out["optimizer"] = adam.state_dict()
    return out
