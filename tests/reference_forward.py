"""An independent, deliberately plain transcription of the authors' text PGM forward pass,
written from the documented numerics (reference/official-pgm.md §2.2, §4.3), working directly
on a checkpoint's tensors. It shares no code with `pgm.models`: the tests use it as the
"reference forward" that imported models must reproduce.
"""

import math

import torch
import torch.nn.functional as F


def layer_norm(x, weight):  # float32 LayerNorm without bias, then the weight
    return F.layer_norm(x.float(), [x.shape[-1]]) * weight


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def linear(state, name, x, bias=True):
    return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias") if bias else None)


def rotary_tables(inv_freq, positions):
    """cos/sin [B, L, 1, D] as the authors' Rotary builds them: t * inv_freq, duplicated halves."""
    freqs = torch.einsum("bi,j->bij", positions.float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, :, None, :], emb.sin()[:, :, None, :]


def rotate(x, tables):  # x [B, L, heads, D]
    cos, sin = tables
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention(q, k, v, allowed):  # [B, L, h, D] each; allowed [B, Lq, Lk]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty row attends to nothing
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v)
    return out.reshape(out.shape[0], out.shape[1], -1)


def timestep_embedding(sigma, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = sigma[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def conditioning(state, batch):
    sigma = torch.zeros(batch)
    h = linear(state, "sigma_map.mlp.0", timestep_embedding(sigma))
    return F.silu(linear(state, "sigma_map.mlp.2", F.silu(h)))


def self_block(state, name, x, c, heads, tables, allowed):
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = linear(state, f"{name}.adaLN_modulation", c)[:, None].chunk(6, 2)
    h = modulate(layer_norm(x, state[f"{name}.norm1.weight"]), shift_a, scale_a)
    qkv = linear(state, f"{name}.attn_qkv", h, bias=False)
    b, length, _ = qkv.shape
    q, k, v = qkv.view(b, length, 3, heads, -1).unbind(2)
    x = x + gate_a * linear(state, f"{name}.attn_out", attention(rotate(q, tables), rotate(k, tables), v, allowed), False)
    h = modulate(layer_norm(x, state[f"{name}.norm2.weight"]), shift_m, scale_m)
    h = linear(state, f"{name}.mlp.2", F.gelu(linear(state, f"{name}.mlp.0", h), approximate="tanh"))
    return x + gate_m * h


def cross_block(state, name, x, memory, c, heads, q_tables, k_tables, allowed):
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = linear(state, f"{name}.adaLN_modulation", c)[:, None].chunk(6, 2)
    b, lq, hidden = x.shape
    q = linear(state, f"{name}.attn_q", modulate(layer_norm(x, state[f"{name}.q_norm1.weight"]), shift_a, scale_a), False)
    kv = linear(state, f"{name}.attn_kv", layer_norm(memory, state[f"{name}.kv_norm1.weight"]), False)
    k, v = kv.view(b, memory.shape[1], 2, heads, -1).unbind(2)
    out = attention(rotate(q.view(b, lq, heads, -1), q_tables), rotate(k, k_tables), v, allowed)
    x = x + gate_a * linear(state, f"{name}.attn_out", out, False)
    h = modulate(layer_norm(x, state[f"{name}.norm2.weight"]), shift_m, scale_m)
    h = linear(state, f"{name}.mlp.2", F.gelu(linear(state, f"{name}.mlp.0", h), approximate="tanh"))
    return x + gate_m * h


def sinusoid(positions, dim):
    denominator = 10000 ** (2 * torch.arange(dim // 2) / dim)
    arg = positions[..., None] / denominator
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


def pgm_forward(state, heads, encoder_blocks, decoder_blocks, clean_tokens, clean_positions, query_positions,
                encoder_allowed, cross_allowed, pre_query_mode="learn+freqs", labels=None, registers=None):
    """Logits at `query_positions`. Training view: clean = queries = the full sequence with group
    masks; inference view: the clean set and the queries with all-True masks.

    The image model (image-stack §3.3-3.5): `labels` [B] make the adaLN input the raw class
    embedding (no SiLU, no MLP); `registers` [R, H] are prepended to the embedded clean tokens
    (the caller's positions and masks count them)."""
    batch, hidden = clean_tokens.shape[0], state["vocab_embed.embedding"].shape[1]
    if labels is None:
        c = conditioning(state, batch)
    else:
        c = state["cls_embed.embedding_table.weight"][labels]
    inv_freq = state["rotary_emb.inv_freq"]
    k_tables, q_tables = rotary_tables(inv_freq, clean_positions), rotary_tables(inv_freq, query_positions)
    x = state["vocab_embed.embedding"][clean_tokens]
    if registers is not None:
        x = torch.cat([registers.expand(batch, -1, -1), x], dim=1)
    for i in range(encoder_blocks):
        x = self_block(state, f"encoder.blocks.{i}", x, c, heads, k_tables, encoder_allowed)
    memory = x
    swap = "decoder.group_swap"
    pre = state[f"{swap}.base_embedding"][None] + sinusoid(query_positions.float(), hidden)
    if pre_query_mode.endswith("+mean"):  # the mean of the encoder states each query may read
        weights = cross_allowed.float()
        pre = pre + weights @ memory / weights.sum(-1, keepdim=True).clamp(min=1)
    elif pre_query_mode.endswith("+logsumexp"):
        pooled = memory[:, None].masked_fill(~cross_allowed[..., None], float("-inf")).logsumexp(2)
        pre = pre + torch.where(pooled.isinf(), 0.0, pooled)
    pre = F.layer_norm(pre, [hidden], state[f"{swap}.pre_query_norm.weight"], state[f"{swap}.pre_query_norm.bias"])
    if f"{swap}.query_processor.weight" in state:
        queries = linear(state, f"{swap}.query_processor", pre)
    else:  # mlp4: Linear -> SiLU -> Linear
        queries = linear(state, f"{swap}.query_processor.2", F.silu(linear(state, f"{swap}.query_processor.0", pre)))
    keys, values = linear(state, f"{swap}.hidden_to_key_value", memory).split(hidden, dim=-1)
    b, lq, lk = batch, queries.shape[1], memory.shape[1]
    out = attention(rotate(queries.view(b, lq, heads, -1), q_tables), rotate(keys.view(b, lk, heads, -1), k_tables),
                    values.view(b, lk, heads, -1), cross_allowed)
    x = linear(state, f"{swap}.output_linear", out)
    for j in range(decoder_blocks):
        x = cross_block(state, f"decoder.layers.{j}", x, memory, c, heads, q_tables, k_tables, cross_allowed)
    shift, scale = linear(state, "output_layer.adaLN_modulation", c)[:, None].chunk(2, 2)
    return linear(state, "output_layer.linear", modulate(layer_norm(x, state["output_layer.norm_final.weight"]),
                                                         shift, scale))
