"""Compiled network calls for the sampling loops (`torch.compile`).

A PGM step's shapes change at every step: the clean set grows and the number of queries follows
the schedule. Compiling `predict` for each shape would recompile at every step, so a compiled
call pads both to a few bucket sizes (`bucket`: four per doubling, 12.5% padding on average)
and compiles with dynamic shapes. The padded clean slots are masked out as keys through
`lengths`; the padded queries repeat a real one and their logits are dropped, which changes
nothing else since the PGM's decoder queries never attend to each other. So inductor compiles
`predict` once per model (for every step count, order and prompt, and every batch size above
one: a batch of one is a specialisation of its own), and CUDA graphs ("reduce-overhead")
record one graph per batch size and pair of buckets instead of one per step.

MDLM and MaskGIT run the whole sequence at every step (fixed shapes); their network is compiled
as it is.
"""

from __future__ import annotations

import functools

import torch
from torch.fx.experimental import _config as fx_config

from ..errors import SamplingError

# torch.compile's modes; "reduce-overhead" and "max-autotune" add CUDA graphs on a GPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SMALLEST_BUCKET = 16
# Each (model, mode) pair is one more compiled entry of the same function: room for many models in
# one process before torch falls back to running it eagerly.
RECOMPILE_LIMIT = 64


COMPILE_CHOICES = ("eager",) + COMPILE_MODES  # what a command line takes: "eager" is no compilation


def compile_mode(text: str) -> str | None:
    """A compile mode given as text (a command line's): "eager" is None."""
    return None if text == "eager" else text


def check_compile_mode(mode: str | None) -> None:
    if mode is not None and mode not in COMPILE_MODES:
        raise SamplingError(f"compile must be one of {', '.join(COMPILE_MODES)} (or None: eager), got {mode!r}")


def bucket(size: int) -> int:
    """The padded size of `size` items: a multiple of SMALLEST_BUCKET up to 128, then of an
    eighth of the next power of two (..., 112, 128, 160, 192, 224, 256, 320, ...): above 128,
    four buckets per doubling, each less than 25% larger than what it holds."""
    if size <= SMALLEST_BUCKET:
        return SMALLEST_BUCKET
    granule = max(SMALLEST_BUCKET, 1 << ((size - 1).bit_length() - 3))
    return -(-size // granule) * granule


@functools.cache
def _compiled(function, mode: str):
    return torch.compile(function, mode=mode, dynamic=True, fullgraph=True)


def compiled_call(model, method: str, mode: str, *args, **kwargs):
    """model.<method>(*args, **kwargs) through torch.compile in `mode`. The class's function is
    compiled once per mode (not each model's bound method, which the cache would keep alive)."""
    function = _compiled(getattr(type(model), method), mode)
    torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
    # Without duck sizing, a clean set and a query count that happen to be equal at the first call
    # do not become one symbol (a guard that the next step breaks).
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT), fx_config.patch(use_duck_shape=False):
        return function(model, *args, **kwargs)


def compiled_predict(model, mode: str, slot_tokens: torch.Tensor, slot_positions: torch.Tensor, num_clean: int,
                     lengths: torch.Tensor | None, queries: torch.Tensor, cond) -> torch.Tensor:
    """`model.predict` on the first `num_clean` (or `lengths`) slots of each row and `queries`
    [B, Q], padded to their buckets: logits [B, Q, V]. The slot buffers must be wide enough for
    the padding or end where they end (their columns past the clean set are never read)."""
    rows, wanted = queries.shape
    width = min(bucket(num_clean), slot_tokens.shape[1])
    if lengths is None:
        lengths = torch.full((rows,), num_clean, dtype=torch.long, device=queries.device)
    padding = bucket(wanted) - wanted
    if padding:
        queries = torch.cat([queries, queries[:, :1].expand(-1, padding)], dim=1)
    # Contiguous copies: a slice's row stride would be one more guard on the shapes.
    logits = compiled_call(model, "predict", mode, slot_tokens[:, :width].contiguous(),
                           slot_positions[:, :width].contiguous(), queries.contiguous(), lengths, cond,
                           check_inputs=False)
    return logits[:, :wanted]
