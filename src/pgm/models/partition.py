"""The Partition Generative Model (PGM) transformer.

    tokens ─embed─> encoder (self-attention only within a group) ─> memory
                                                                      │
    positions ─> GroupSwap queries ─cross-attend to the OTHER group──┘─> cross-attention decoder ─> logits

Training view, `model(tokens, groups)`: every position is predicted from the tokens of the
other group, in one pass, with block masks `g_i == g_j` (encoder) and `g_i != g_j` (decoder).

Inference view, `model.predict(clean_tokens, clean_positions, query_positions)`: the encoder
sees only the clean tokens, the decoder only the queried positions. Because a query in the
training view attends exactly the other group's encoder states, and those states depend only
on that group, `predict` with clean set = group 0 reproduces the training view's logits at
group-1 positions.

Cached inference view, `model.predict_cached(cache, ...)`: the same, except that a clean token's
encoder states (the keys and values of every block, and what the decoder reads of its output)
are kept in an `EncoderCache` (`encoder_cache.py`) from the call that encoded it. A call
encodes only the tokens that became clean since the last one, attending to the cached keys and
values of the older tokens and to each other; a refresh re-encodes the whole clean set. Without refreshes, a token
is encoded as if by an encoder in which each token attends only to tokens that were clean no
later than itself: an approximation of the bidirectional encoder, exact for the first call.

Shapes in the comments: B rows; L token positions and R registers (0 or 2); N clean tokens and
Q queried positions of `predict`; n tokens that a `predict_cached` call encodes, S slots of its
cache and K slots that its queries read; Lk keys (encoded states) and Lq queries of a block, in
whichever view; D hidden size, split into `heads` heads of d channels; C conditioning width; V
vocabulary size.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
from torch import nn

from ..config import require
from ..errors import ArgumentError
from .base import TimeConditionedModel, TokenTransformerConfig, check_ids, check_labels
from .encoder_cache import EncoderCache, SlotPlan
from .layers import (ClassEmbedding, CrossAttentionBlock, FinalLayer, Float32LayerNorm, Float32RMSNorm, GroupMask,
                     Rotary, SelfAttentionBlock, TimestepEmbedder, TokenEmbedding, apply_rotary, attend, sinusoid,
                     split_heads)

PreQueryMode = Literal["learn", "learn+freqs", "learn+freqs+mean", "learn+freqs+logsumexp"]


@dataclasses.dataclass
class PartitionConfig(TokenTransformerConfig):
    """Shape and options of a `PartitionTransformer`."""

    kind: ClassVar[str] = "pgm"

    encoder_blocks: int = 8
    decoder_blocks: int = 8
    pre_query_mode: PreQueryMode = "learn+freqs"
    query_processor: Literal["linear", "mlp4"] = "linear"
    query_norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    num_classes: int = 0  # > 0: class-conditional (adaLN from a class embedding; label num_classes = no class)
    registers: int = 0  # 2: one learned register per group, as the authors' image model

    @property
    def sequence_length(self) -> int:
        """Positions inside the network: the registers, then the `length` token positions."""
        return self.length + self.registers

    def validate(self) -> None:
        super().validate()
        require(self.registers in (0, 2), f"registers must be 0 or 2 (one per group), got {self.registers}")
        require(self.num_classes >= 0, f"num_classes must be non-negative, got {self.num_classes}")
        require(not (self.num_classes and self.time_conditioning),
                "a class-conditional model cannot also be time-conditioned: its adaLN input is the class embedding")
        require(self.encoder_blocks >= 1, f"encoder_blocks must be positive, got {self.encoder_blocks}")
        require(self.decoder_blocks >= 0, f"decoder_blocks must be non-negative, got {self.decoder_blocks}")
        require(self.hidden_size % 2 == 0, f"hidden_size must be even for GroupSwap's sinusoid, got {self.hidden_size}")


class Encoder(nn.Module):
    def __init__(self, config: PartitionConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(config.hidden_size, config.num_heads, config.cond_dim, config.mlp_ratio, config.dropout)
            for _ in range(config.encoder_blocks))

    def forward(self, x, cond, rope, mask):
        # x [B, Lk, D]; cond [B or 1, C]; rope cos, sin [B or 1, 1, Lk, d]; mask [B, 1, Lk, Lk] or less, or None
        for block in self.blocks:
            x = block(x, cond, rope, mask)  # [B, Lk, D]
        return x


class GroupSwap(nn.Module):
    """Builds one query per position from the position alone (plus, in the `+mean` and
    `+logsumexp` modes, a summary of the other group) and lets it read the other group's
    encoder states. Its output replaces the stream: there is no residual."""

    def __init__(self, config: PartitionConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.mode = config.pre_query_mode
        self.base_embedding = nn.Parameter(torch.randn(1, hidden))
        self.pre_query_norm = (Float32LayerNorm(hidden) if config.query_norm == "layernorm"
                               else Float32RMSNorm(hidden))
        if config.query_processor == "linear":
            self.query_processor = nn.Linear(hidden, hidden)
        else:
            self.query_processor = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.SiLU(),
                                                 nn.Linear(4 * hidden, hidden))
        self.hidden_to_key_value = nn.Linear(hidden, 2 * hidden)
        self.output_linear = nn.Linear(hidden, hidden)
        self.register_buffer("pos_freqs", sinusoid(torch.arange(config.sequence_length), hidden), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the position sinusoid, which is not saved with the weights (a model built on
        the meta device and then given storage holds garbage there until this runs)."""
        length, hidden = self.pos_freqs.shape
        positions = torch.arange(length, device=self.base_embedding.device)
        self.pos_freqs = sinusoid(positions, hidden).to(self.pos_freqs.dtype)

    @property
    def content_dependent(self) -> bool:
        return self.mode in ("learn+freqs+mean", "learn+freqs+logsumexp")

    def queries(self, positions: torch.Tensor, summary: torch.Tensor | None) -> torch.Tensor:
        """The queries of `positions` ([Lq] or [B, Lq]), plus `summary` ([B, Lq or 1, D]) when given."""
        pre = self.base_embedding  # [1, D]
        if self.mode != "learn":
            pre = pre + self.pos_freqs[positions]  # [Lq, D] or [B, Lq, D]
        else:
            pre = pre.expand(*positions.shape, -1)  # [Lq, D] or [B, Lq, D]: one query for every position
        if pre.dim() == 2:
            pre = pre[None]  # [1, Lq, D]
        if summary is not None:
            pre = pre + summary  # [B, Lq, D]
        return self.query_processor(self.pre_query_norm(pre))  # [B or 1, Lq, D]

    def summarise(self, memory: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """Mean or logsumexp of the encoder states `memory` where `members` [B, Lk] is True. An
        empty selection gives zeros, with zero gradient."""
        members = members[..., None]  # [B, Lk, 1]
        if self.mode == "learn+freqs+mean":
            count = members.sum(1).clamp(min=1)  # [B, 1]
            return (memory * members).sum(1) / count  # [B, D]
        nonempty = members.any(1)  # [B, 1]
        # [B, Lk, D]; an empty row is zeros rather than all -inf, whose logsumexp has a NaN gradient
        filled = memory.masked_fill(~members, float("-inf")).where(nonempty[:, None], 0.0)
        return torch.logsumexp(filled, dim=1).where(nonempty, 0.0)  # [B, D]

    def keys_values(self, memory: torch.Tensor, key_rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values of the encoder states `memory`."""
        k, v = self.hidden_to_key_value(memory).chunk(2, dim=-1)  # [B, Lk, D] each
        # [B, heads, Lk, d] each
        return apply_rotary(split_heads(k, self.num_heads), key_rope), split_heads(v, self.num_heads)

    def forward(self, keys_values, query_positions, query_rope, mask, summary):
        k, v = keys_values  # [B, heads, Lk, d] each
        q = self.queries(query_positions, summary)  # [B or 1, Lq, D]
        q = split_heads(q.expand(k.shape[0], -1, -1), self.num_heads)  # [B, heads, Lq, d]
        return self.output_linear(attend(apply_rotary(q, query_rope), k, v, mask))  # [B, Lq, D]


class Decoder(nn.Module):
    def __init__(self, config: PartitionConfig):
        super().__init__()
        self.group_swap = GroupSwap(config)
        self.layers = nn.ModuleList(
            CrossAttentionBlock(config.hidden_size, config.num_heads, config.cond_dim, config.mlp_ratio, config.dropout)
            for _ in range(config.decoder_blocks))

    def keys_values(self, memory: torch.Tensor, key_rope) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What GroupSwap and then each layer read of the encoder states: 1 + layers pairs of keys
        and values [B, heads, Lk, d]."""
        return [self.group_swap.keys_values(memory, key_rope)] + [
            layer.project_keys_values(memory, key_rope) for layer in self.layers]

    def forward(self, keys_values, cond, query_positions, query_rope, mask, summary):
        x = self.group_swap(keys_values[0], query_positions, query_rope, mask, summary)  # [B, Lq, D]
        for layer, layer_keys_values in zip(self.layers, keys_values[1:]):
            x = layer(x, layer_keys_values, cond, query_rope, mask)  # [B, Lq, D]
        return x


class PartitionTransformer(TimeConditionedModel):
    """Encoder over clean tokens, GroupSwap, cross-attention-only decoder, adaLN output layer.

    Conditioning: the noise level through `sigma_map` (text), or a class label through
    `cls_embed` (images: `num_classes` > 0). With `registers` = 2 the network also sees two
    learned tokens before position 0, one in each group (sequence positions 0 and 1; token
    position p sits at sequence position p + 2), so that neither group is ever empty.
    """

    config_class = PartitionConfig

    def __init__(self, config: PartitionConfig):
        super().__init__()
        self.config = config
        self.vocab_embed = TokenEmbedding(config.vocab_size, config.hidden_size)
        if config.num_classes:
            self.cls_embed = ClassEmbedding(config.num_classes + 1, config.cond_dim)
        self.rotary_emb = Rotary(config.hidden_size // config.num_heads)
        if not config.num_classes:
            self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.output_layer = FinalLayer(config.hidden_size, config.vocab_size, config.cond_dim)
        if config.registers:
            # Row 0 belongs to group 1, row 1 to group 0 (the clean set at sampling time).
            self.reg_tokens = nn.Embedding(config.registers, config.hidden_size)
            nn.init.normal_(self.reg_tokens.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, groups: torch.Tensor, cond: torch.Tensor | None = None, *,
                check_inputs: bool = True) -> torch.Tensor:
        """Training view: logits at every position, each predicted from the other group.

        tokens: [B, L] ids; groups: [B, L] of 0/1 (or bool); cond: noise levels or class labels [B].
        """
        batch, length = tokens.shape  # B, L
        if check_inputs:
            self._check_common("tokens", tokens, cond, batch)
            if length > self.config.length:
                raise ArgumentError(f"tokens have length {length}, longer than the model's length {self.config.length}")
            if groups.shape != tokens.shape:
                raise ArgumentError(f"groups has shape {tuple(groups.shape)} but tokens have shape "
                                    f"{tuple(tokens.shape)}")
            if groups.dtype != torch.bool and not bool(((groups == 0) | (groups == 1)).all()):
                raise ArgumentError("groups must hold only 0 and 1")
        groups = groups.bool()  # [B, L]
        cond_vector = self.conditioning(cond, batch)  # [B or 1, C]
        x = self.vocab_embed(tokens)  # [B, L, D]
        registers = self.config.registers  # R
        if registers:
            x = torch.cat([self.reg_tokens.weight.to(x.dtype).expand(batch, -1, -1), x], dim=1)  # [B, R+L, D]
            register_groups = torch.tensor([True, False], device=tokens.device).expand(batch, -1)  # [B, R]
            groups = torch.cat([register_groups, groups], dim=1)  # [B, R+L]
        positions = torch.arange(length + registers, device=tokens.device)  # [R+L] sequence positions
        rope = self.rotary_emb(positions)  # cos, sin [1, 1, R+L, d]
        memory = self.encoder(x, cond_vector, rope, GroupMask(groups, groups, same=True))  # [B, R+L, D]
        summary = None
        if self.decoder.group_swap.content_dependent:
            summarise = self.decoder.group_swap.summarise
            of_group0, of_group1 = summarise(memory, ~groups), summarise(memory, groups)  # [B, D] each
            # [B, L, D]: each query reads the summary of the other group
            summary = torch.where(groups[:, registers:, None], of_group0[:, None], of_group1[:, None])
        # The registers are never predicted: queries start at the first token position.
        query_rope = tuple(c[:, :, registers:] for c in rope)  # cos, sin [1, 1, L, d]
        x = self.decoder(self.decoder.keys_values(memory, rope), cond_vector, positions[registers:], query_rope,
                         GroupMask(groups[:, registers:], groups, same=False), summary)  # [B, L, D]
        return self.output_layer(x, cond_vector)  # [B, L, V]

    def predict(self, clean_tokens: torch.Tensor, clean_positions: torch.Tensor, query_positions: torch.Tensor,
                lengths: torch.Tensor | None = None, cond: torch.Tensor | None = None, *,
                check_inputs: bool = True) -> torch.Tensor:
        """Inference view: logits at `query_positions` given only the clean tokens.

        clean_tokens, clean_positions: [B, N]; query_positions: [B, Q]; lengths: [B] number of
        valid clean tokens per row when rows hold clean sets of different sizes (right-padded),
        or None when all N are valid. Samplers that build their own inputs pass
        `check_inputs=False` to skip the host-side checks.
        """
        if check_inputs:
            self._check_common("clean_tokens", clean_tokens, cond, clean_tokens.shape[0])
            self._check_predict_inputs(clean_tokens, clean_positions, query_positions, lengths)
        batch, num_clean = clean_tokens.shape  # B, N
        cond_vector = self.conditioning(cond, batch)  # [B or 1, C]
        x = self.vocab_embed(clean_tokens)  # [B, N, D]
        registers = self.config.registers
        if registers:
            # The clean set holds group 0's register (row 1, sequence position 1).
            x = torch.cat([self.reg_tokens.weight[1:].to(x.dtype).expand(batch, -1, -1), x], dim=1)  # [B, 1+N, D]
            register_position = torch.ones(batch, 1, dtype=clean_positions.dtype, device=clean_positions.device)
            clean_positions = torch.cat([register_position, clean_positions + registers], dim=1)  # [B, 1+N]
            query_positions = query_positions + registers  # [B, Q] sequence positions
            num_clean += 1  # N counts the register from here on
            lengths = None if lengths is None else lengths + 1
        key_rope = self.rotary_emb(clean_positions)  # cos, sin [B, 1, N, d]
        query_rope = self.rotary_emb(query_positions)  # cos, sin [B, 1, Q, d]
        valid = mask = None  # None: every clean column is a real token
        if lengths is not None:
            valid = torch.arange(num_clean, device=clean_tokens.device) < lengths[:, None]  # [B, N]
            mask = valid[:, None, None, :]  # [B, 1, 1, N]: no query or token reads the padding
        memory = self.encoder(x, cond_vector, key_rope, mask)  # [B, N, D]
        summary = None
        if self.decoder.group_swap.content_dependent:
            members = valid if valid is not None else torch.ones(batch, num_clean, dtype=torch.bool,
                                                                 device=clean_tokens.device)  # [B, N]
            summary = self.decoder.group_swap.summarise(memory, members)[:, None]  # [B, 1, D], the same for every query
        x = self.decoder(self.decoder.keys_values(memory, key_rope), cond_vector, query_positions, query_rope, mask,
                         summary)  # [B, Q, D]
        return self.output_layer(x, cond_vector)  # [B, Q, V] logits of the queries only

    def new_cache(self) -> EncoderCache:
        """An empty cache for `predict_cached`: one per sampling run (its rows are the run's)."""
        return EncoderCache(self.config.length, bool(self.config.registers), len(self.encoder.blocks),
                            1 + len(self.decoder.layers))

    def predict_cached(self, cache: EncoderCache, slot_tokens: torch.Tensor, slot_positions: torch.Tensor,
                       visible: int | torch.Tensor, query_positions: torch.Tensor, cond: torch.Tensor | None = None,
                       *, refresh: bool = False) -> torch.Tensor:
        """`predict` with the clean set's encoder states kept in `cache` between calls.

        slot_tokens, slot_positions: [B, N] the clean set packed left in slots that only grow
        (a sampler's buffers); visible: how many slots of each row are clean now (int or [B]).
        Slots from `cache.encoded` to `visible` are encoded now, against the cached keys and
        values of the slots before them and each other; `refresh` re-encodes every visible slot,
        and then the logits are `predict`'s. The first call on an empty cache is a refresh.
        """
        batch = slot_tokens.shape[0]  # B
        device = slot_tokens.device
        refresh = refresh or cache.empty
        start = 0 if refresh else cache.encoded  # the first slot encoded now: int or [B]
        offset = cache.offset  # the cache's slot of clean slot 0 (1 with a register)
        with_register = refresh and self.config.registers  # the clean set's register is encoded with the rest
        if isinstance(start, torch.Tensor) or isinstance(visible, torch.Tensor):  # ragged rows
            start = torch.as_tensor(start, device=device).expand(batch)  # [B]
            visible = torch.as_tensor(visible, device=device).expand(batch)  # [B]
            columns = start[:, None] + torch.arange(int((visible - start).max()), device=device)  # [B, n]
            fresh = columns < visible[:, None]  # [B, n]: False on a row's padding
            columns = columns.clamp(max=slot_tokens.shape[1] - 1)  # [B, n], padding kept inside the buffers
            new_tokens, new_positions = slot_tokens.gather(1, columns), slot_positions.gather(1, columns)  # [B, n]
            index = torch.where(fresh, columns + offset, cache.sink)  # [B, n] cache slots, padding to the sink
            if with_register:
                index = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=device), index], dim=1)  # [B, 1+n]
            width = int(visible.max()) + offset  # K
            key_mask = (torch.arange(width, device=device) < visible[:, None] + offset)[:, None, None]  # [B, 1, 1, K]
            cache.plan = SlotPlan(None, index, width, key_mask, only_new=refresh)
        else:
            new_tokens, new_positions = slot_tokens[:, start:visible], slot_positions[:, start:visible]  # [B, n]
            cache.plan = SlotPlan(0 if with_register else start + offset, None, visible + offset, None,
                                  only_new=refresh)
        plan = cache.plan
        registers = self.config.registers
        new_positions = new_positions + registers  # [B, n] sequence positions
        x = self.vocab_embed(new_tokens)  # [B, n, D]
        if with_register:  # row 1 at sequence position 1, as in `predict`
            x = torch.cat([self.reg_tokens.weight[1:].to(x.dtype).expand(batch, -1, -1), x], dim=1)  # [B, 1+n, D]
            new_positions = torch.cat([torch.ones(batch, 1, dtype=new_positions.dtype, device=device), new_positions],
                                      dim=1)  # [B, 1+n]
        cond_vector = self.conditioning(cond, batch)  # [B or 1, C]
        summarise = self.decoder.group_swap.content_dependent
        if x.shape[1] or refresh:
            key_rope = self.rotary_emb(new_positions)  # cos, sin [B, 1, n, d]
            for block, states in zip(self.encoder.blocks, cache.blocks):
                x = block(x, cond_vector, key_rope, cache=states)  # [B, n, D], reading K keys and values
            if summarise:  # the final states themselves are read only by a content-dependent GroupSwap
                cache.memory = cache.store(cache.memory, x, 1)  # [B, S, D]
            readers = [states.extend(k, v)[:2]  # 1 + decoder layers pairs of [B, heads, K, d]
                       for states, (k, v) in zip(cache.readers, self.decoder.keys_values(x, key_rope))]
            memory = cache.keys(cache.memory, x, 1) if summarise else None  # [B, K, D]
            cache.empty = False
        else:
            readers = [states.read() for states in cache.readers]  # 1 + decoder layers pairs of [B, heads, K, d]
            memory = cache.memory.narrow(1, 0, plan.width) if summarise else None  # [B, K, D]
        cache.encoded = visible
        summary = None
        if summarise:
            members = (plan.key_mask[:, 0, 0] if plan.key_mask is not None
                       else torch.ones(batch, plan.width, dtype=torch.bool, device=device))  # [B, K]
            summary = self.decoder.group_swap.summarise(memory, members)[:, None]  # [B, 1, D]
        query_positions = query_positions + registers  # [B, Q] sequence positions
        x = self.decoder(readers, cond_vector, query_positions, self.rotary_emb(query_positions), plan.key_mask,
                         summary)  # [B, Q, D]
        return self.output_layer(x, cond_vector)  # [B, Q, V] logits of the queries only

    def _check_common(self, name, tokens, cond, batch) -> None:
        check_ids(name, tokens, self.config.vocab_size)
        if self.config.num_classes:
            check_labels(cond, batch, self.config.num_classes)

    def _check_predict_inputs(self, clean_tokens, clean_positions, query_positions, lengths) -> None:
        length = self.config.length
        check_ids("clean_positions", clean_positions, length, what="position")
        check_ids("query_positions", query_positions, length, what="position")
        if clean_positions.shape != clean_tokens.shape:
            raise ArgumentError(f"clean_positions has shape {tuple(clean_positions.shape)} "
                                f"but clean_tokens has shape {tuple(clean_tokens.shape)}")
        batch, num_clean = clean_tokens.shape
        if query_positions.shape[0] != batch:
            raise ArgumentError(f"query_positions has batch size {query_positions.shape[0]}, clean_tokens {batch}")
        if lengths is not None:
            if lengths.shape != (batch,) or lengths.dtype.is_floating_point:
                raise ArgumentError(f"lengths must be an integer tensor of shape [{batch}], got {tuple(lengths.shape)}")
            if bool((lengths < 0).any()) or bool((lengths > num_clean).any()):
                raise ArgumentError(f"lengths must lie in [0, {num_clean}], the number of clean columns")
            valid = torch.arange(num_clean, device=lengths.device) < lengths[:, None]
        else:
            valid = torch.ones_like(clean_positions, dtype=torch.bool)
        # Padding slots get distinct negative stand-ins so that only real positions can collide.
        stand_ins = -1 - torch.arange(num_clean, device=clean_positions.device).expand_as(clean_positions)
        everything = torch.cat([torch.where(valid, clean_positions, stand_ins), query_positions], dim=1)
        ordered = everything.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if bool(repeated.any()):
            row = int(repeated.any(1).nonzero()[0])
            position = int(ordered[row, 1:][repeated[row]][0])
            raise ArgumentError(f"position {position} appears more than once among the clean and query positions "
                                f"of row {row}")
