"""Storage of the PGM's encoder cache (`PartitionTransformer.predict_cached`).

A cache keeps, slot by slot in a sampler's packed order, what the model computed for each clean
token: the keys and values of every encoder block, those that GroupSwap and each decoder layer
read of the encoder's output, and (for a content-dependent GroupSwap) the output itself. Internal
slot 0 holds the register when the model has registers; the last slot is a sink where the padding
of ragged rows is written and never read.

Shapes: B rows, S slots (`capacity`), n tokens encoded by one call, K slots a query reads
(`width`), h heads, d head dimension, D hidden size.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class SlotPlan:
    """The slots one call writes and reads. Writes: the encoded tokens go to slots `start`.. (rows
    in step) or to `index` [B, n] (ragged rows; padding goes to the sink). Reads: the queries see the
    slots below `width`, those where `key_mask` [B, 1, 1, K] holds (None: all of them).
    `only_new`: the call encodes every slot it reads (a refresh), so attention needs no cache reads."""

    start: int | None
    index: torch.Tensor | None
    width: int
    key_mask: torch.Tensor | None
    only_new: bool


class EncoderCache:
    """Clean-set states of a PGM kept between sampling steps. `encoded`: how many of each row's
    clean slots hold states (an int, or [B] when rows differ); `plan`: the current call's slots."""

    def __init__(self, length: int, registers: bool, encoder_blocks: int, readers: int):
        self.offset = int(registers)
        self.capacity = length + self.offset + 1  # S: the register, every position, the sink
        self.sink = self.capacity - 1
        self.empty = True
        self.encoded: int | torch.Tensor = 0
        self.plan: SlotPlan | None = None
        self.blocks = [KeyValueSlots(self) for _ in range(encoder_blocks)]
        self.readers = [KeyValueSlots(self) for _ in range(readers)]  # GroupSwap's, then each decoder layer's
        self.memory: torch.Tensor | None = None  # [B, S, D] final encoder states, when GroupSwap reads them

    def store(self, buffer: torch.Tensor | None, new: torch.Tensor, dim: int) -> torch.Tensor:
        """Write `new` (the encoded tokens along `dim`) into `buffer`, allocated at the first
        write with `capacity` slots along `dim`; returns the buffer."""
        if buffer is None:
            shape = list(new.shape)
            shape[dim] = self.capacity
            buffer = new.new_zeros(shape)  # masked slots must hold finite values: NaN * 0 is NaN
        plan = self.plan
        if plan.index is None:
            buffer.narrow(dim, plan.start, new.shape[dim]).copy_(new)
        else:
            shape = [1] * new.dim()
            shape[0], shape[dim] = plan.index.shape
            buffer.scatter_(dim, plan.index.view(shape).expand_as(new), new)
        return buffer

    def keys(self, buffer: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
        """What a query reads along `dim`: the new states themselves on a refresh, otherwise the
        buffer's first `width` slots."""
        return new if self.plan.only_new else buffer.narrow(dim, 0, self.plan.width)


class KeyValueSlots:
    """Cached keys and values [B, h, S, d] of one encoder block or one decoder reader; `extend`
    is the hook `SelfAttentionBlock` calls."""

    def __init__(self, cache: EncoderCache):
        self.cache = cache
        self.keys_buffer = self.values_buffer = None

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        """Store the new tokens' k, v [B, h, n, d]; return the keys and values [B, h, K, d] and
        the key mask a query reads."""
        cache = self.cache
        self.keys_buffer = cache.store(self.keys_buffer, k, 2)
        self.values_buffer = cache.store(self.values_buffer, v, 2)
        return cache.keys(self.keys_buffer, k, 2), cache.keys(self.values_buffer, v, 2), cache.plan.key_mask

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values [B, h, K, d] a query reads when the call encoded nothing."""
        width = self.cache.plan.width
        return self.keys_buffer.narrow(2, 0, width), self.values_buffer.narrow(2, 0, width)
