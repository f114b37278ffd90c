"""Import the authors' released text checkpoints (`pgm_8_8.ckpt`, `pgm_6_6_dim1024.ckpt`, their
`_sdtt_fp32_50k` versions, `mdlm.ckpt`, `mdlm_sdtt_50k.ckpt`) without their code.

They are PyTorch Lightning checkpoints: `state_dict` (keys prefixed `backbone.`), `ema`
(`shadow_params`, a list in parameter order) and `hyper_parameters`, which pickles an OmegaConf
config and a Hugging Face tokenizer. We read them with a restricted unpickler: tensors and
plain containers come through; every other class becomes an inert `Stub` that only records
what the pickle stream said about it, so nothing from the file is ever executed. The config
values we need are then recovered from the OmegaConf stubs' recorded state.

What the weights' shapes tell us (hidden size, vocabulary, heads, blocks, conditioning size,
MLP ratio, query processor and norm) is inferred from them; what they cannot tell (GroupSwap's
pre-query mode, the length, the mask id, time conditioning) comes from the pickled config,
and every such value can be overridden explicitly.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..formats import check_weights
from ..models import MaskedDiffusionConfig, PartitionConfig, build_model
from .unpickling import CheckpointImportError, load_restricted, lookup, to_plain

KNOWN_MASK_IDS = {"gpt2": None, "gpt2-large": None, "gpt2-medium": None, "bert-base-uncased": 103}


def official_parameter_order(kind: str, encoder_blocks: int, decoder_blocks: int, query_processor: str,
                             query_norm: str) -> list[str]:
    """Parameter names in the order of `backbone.parameters()` in the authors' code (the order
    of the EMA `shadow_params` list), written out from their module registration order."""
    def block(prefix: str) -> list[str]:
        return [f"{prefix}.norm1.weight", f"{prefix}.attn_qkv.weight", f"{prefix}.attn_out.weight",
                f"{prefix}.norm2.weight", f"{prefix}.mlp.0.weight", f"{prefix}.mlp.0.bias", f"{prefix}.mlp.2.weight",
                f"{prefix}.mlp.2.bias", f"{prefix}.adaLN_modulation.weight", f"{prefix}.adaLN_modulation.bias"]

    def cross(prefix: str) -> list[str]:
        return [f"{prefix}.{n}.weight" for n in ("q_norm1", "kv_norm1", "norm2", "attn_q", "attn_kv", "attn_out")] + [
            f"{prefix}.mlp.0.weight", f"{prefix}.mlp.0.bias", f"{prefix}.mlp.2.weight", f"{prefix}.mlp.2.bias",
            f"{prefix}.adaLN_modulation.weight", f"{prefix}.adaLN_modulation.bias"]

    names = ["vocab_embed.embedding", "sigma_map.mlp.0.weight", "sigma_map.mlp.0.bias", "sigma_map.mlp.2.weight",
             "sigma_map.mlp.2.bias"]
    final = ["output_layer.norm_final.weight", "output_layer.linear.weight", "output_layer.linear.bias",
             "output_layer.adaLN_modulation.weight", "output_layer.adaLN_modulation.bias"]
    if kind == "mdlm":
        return names + [n for i in range(encoder_blocks) for n in block(f"blocks.{i}")] + final
    swap = "decoder.group_swap"
    norm = [f"{swap}.pre_query_norm.weight"] + ([f"{swap}.pre_query_norm.bias"] if query_norm == "layernorm" else [])
    processor = ([f"{swap}.query_processor.weight", f"{swap}.query_processor.bias"] if query_processor == "linear" else
                 [f"{swap}.query_processor.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")])
    return (names + [n for i in range(encoder_blocks) for n in block(f"encoder.blocks.{i}")]
            + [f"{swap}.base_embedding"] + norm + processor
            + [f"{swap}.hidden_to_key_value.weight", f"{swap}.hidden_to_key_value.bias",
               f"{swap}.output_linear.weight", f"{swap}.output_linear.bias"]
            + [n for j in range(decoder_blocks) for n in cross(f"decoder.layers.{j}")] + final)


def _count_blocks(state: dict, prefix: str) -> int:
    indices = {int(m.group(1)) for key in state if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.", key))}
    if indices != set(range(len(indices))):
        raise CheckpointImportError(f"the checkpoint's {prefix} are not numbered 0..{len(indices) - 1}: {sorted(indices)}")
    return len(indices)


def _shape(state: dict, key: str) -> torch.Size:
    if key not in state:
        raise CheckpointImportError(f"the checkpoint has no tensor {key!r}")
    return state[key].shape


def infer_text_config(state: dict, hyper: dict, overrides: dict | None = None):
    """A PartitionConfig or MaskedDiffusionConfig for the backbone `state` (prefix removed)."""
    overrides = dict(overrides or {})
    vocab_size, hidden = _shape(state, "vocab_embed.embedding")
    if "rotary_emb.inv_freq" in state:
        head_dim = 2 * state["rotary_emb.inv_freq"].shape[0]
    elif isinstance(lookup(hyper, "config.model.n_heads"), int) or "num_heads" in overrides:
        head_dim = hidden // (overrides.get("num_heads") or lookup(hyper, "config.model.n_heads"))
    else:
        raise CheckpointImportError("neither rotary_emb.inv_freq nor the config tells the number of heads; "
                                    "pass num_heads")
    if hidden % head_dim:
        raise CheckpointImportError(f"hidden size {hidden} is not a multiple of the rotary head dimension {head_dim}")
    kind = "pgm" if any(k.startswith("encoder.") for k in state) else "mdlm"
    first_block = "encoder.blocks.0" if kind == "pgm" else "blocks.0"
    cond_dim = _shape(state, f"{first_block}.adaLN_modulation.weight")[1]
    mlp_hidden = _shape(state, f"{first_block}.mlp.0.weight")[0]
    if mlp_hidden % hidden:
        raise CheckpointImportError(f"the MLP width {mlp_hidden} is not a multiple of the hidden size {hidden}")
    tokenizer_name = lookup(hyper, "config.data.tokenizer_name_or_path")
    mask_id = KNOWN_MASK_IDS.get(tokenizer_name) if isinstance(tokenizer_name, str) else None
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_heads=hidden // head_dim, cond_dim=cond_dim,
                  mlp_ratio=mlp_hidden // hidden,
                  length=lookup(hyper, "config.model.length", 1024),
                  dropout=float(lookup(hyper, "config.model.dropout", 0.1)),
                  time_conditioning=bool(lookup(hyper, "config.algo.time_conditioning", False)),
                  mask_token_id=mask_id)
    if kind == "pgm":
        common.update(
            encoder_blocks=_count_blocks(state, "encoder.blocks"), decoder_blocks=_count_blocks(state, "decoder.layers"),
            pre_query_mode=lookup(hyper, "config.model.swap.pre_query_mode", "learn+freqs"),
            query_processor="linear" if "decoder.group_swap.query_processor.weight" in state else "mlp4",
            query_norm="layernorm" if "decoder.group_swap.pre_query_norm.bias" in state else "rmsnorm")
    else:
        common.update(blocks=_count_blocks(state, "blocks"))
    common.update({k: v for k, v in overrides.items() if v is not None})
    return (PartitionConfig if kind == "pgm" else MaskedDiffusionConfig).from_dict(common)


def read_official_text_checkpoint(path: Path, *, weights: str = "ema", **overrides):
    """(model in eval mode, hyper-parameters as plain data) from a released text checkpoint.
    `overrides` set config fields the file cannot tell (pre_query_mode, length, mask_token_id, ...)."""
    check_weights(weights)
    content = load_restricted(path)
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
        raise CheckpointImportError(f"{path} is not a Lightning checkpoint of the paper's models (no state_dict)")
    hyper = to_plain(content.get("hyper_parameters") or {})
    hyper = hyper if isinstance(hyper, dict) else {}
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in content["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointImportError(f"{path} has no backbone.* tensors; it is not one of the paper's text checkpoints")
    try:
        config = infer_text_config(state, hyper, overrides)
    except ValueError as error:
        raise CheckpointImportError(f"{path}: {error}") from None
    model = build_model(config)
    expected = model.state_dict()
    # inv_freq is a fixed function of the head dimension; older files may not carry it.
    state.setdefault("rotary_emb.inv_freq", expected["rotary_emb.inv_freq"])
    _check_tensors(state, expected, "state_dict")
    if weights == "ema":
        ema = content.get("ema")
        if not isinstance(ema, dict) or not isinstance(ema.get("shadow_params"), (list, tuple)):
            raise CheckpointImportError(f"{path} holds no EMA weights; import it with weights='raw'")
        names = official_parameter_order(config.kind, getattr(config, "encoder_blocks", getattr(config, "blocks", 0)),
                                         getattr(config, "decoder_blocks", 0), getattr(config, "query_processor", ""),
                                         getattr(config, "query_norm", ""))
        shadow = list(ema["shadow_params"])
        if len(shadow) != len(names):
            raise CheckpointImportError(f"the EMA holds {len(shadow)} tensors but the model has {len(names)} parameters")
        for name, tensor in zip(names, shadow):
            if tuple(tensor.shape) != tuple(state[name].shape):
                raise CheckpointImportError(f"EMA tensor for {name} has shape {tuple(tensor.shape)}, "
                                   f"expected {tuple(state[name].shape)}")
        state = {**state, **dict(zip(names, shadow))}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval(), hyper


def _check_tensors(found: dict, expected: dict, where: str) -> None:
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing:
        raise CheckpointImportError(f"the {where} lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if extra:
        raise CheckpointImportError(f"the {where} has an unexpected tensor {extra[0]}"
                           + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    for key, tensor in expected.items():
        if tuple(found[key].shape) != tuple(tensor.shape):
            raise CheckpointImportError(f"tensor {key} has shape {tuple(found[key].shape)}, the inferred configuration "
                               f"expects {tuple(tensor.shape)}")
