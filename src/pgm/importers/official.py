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

import dataclasses
import math
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..formats import check_weights
from ..models import MaskedDiffusionConfig, MaskGITConfig, PartitionConfig, build_model
from ..models.layers import Rotary
from .checks import check_tensors, count_blocks, float32, shape_of, strip_prefixes
from .llamagen import VQ8_IMAGE_SIZE, load_llamagen_vq, vq_state
from .unpickling import load_restricted, lookup, to_plain

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


def infer_text_config(state: dict, hyper: dict, overrides: dict | None = None):
    """A PartitionConfig or MaskedDiffusionConfig for the backbone `state` (prefix removed)."""
    overrides = dict(overrides or {})
    vocab_size, hidden = shape_of(state, "vocab_embed.embedding")
    if "rotary_emb.inv_freq" in state:
        head_dim = 2 * state["rotary_emb.inv_freq"].shape[0]
    elif isinstance(lookup(hyper, "config.model.n_heads"), int) or "num_heads" in overrides:
        head_dim = hidden // (overrides.get("num_heads") or lookup(hyper, "config.model.n_heads"))
    else:
        raise CheckpointError("neither rotary_emb.inv_freq nor the config tells the number of heads; "
                              "pass num_heads")
    if hidden % head_dim:
        raise CheckpointError(f"hidden size {hidden} is not a multiple of the rotary head dimension {head_dim}")
    kind = "pgm" if any(k.startswith("encoder.") for k in state) else "mdlm"
    first_block = "encoder.blocks.0" if kind == "pgm" else "blocks.0"
    cond_dim = shape_of(state, f"{first_block}.adaLN_modulation.weight")[1]
    mlp_hidden = shape_of(state, f"{first_block}.mlp.0.weight")[0]
    if mlp_hidden % hidden:
        raise CheckpointError(f"the MLP width {mlp_hidden} is not a multiple of the hidden size {hidden}")
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
            encoder_blocks=count_blocks(state, "encoder.blocks"), decoder_blocks=count_blocks(state, "decoder.layers"),
            pre_query_mode=lookup(hyper, "config.model.swap.pre_query_mode", "learn+freqs"),
            query_processor="linear" if "decoder.group_swap.query_processor.weight" in state else "mlp4",
            query_norm="layernorm" if "decoder.group_swap.pre_query_norm.bias" in state else "rmsnorm")
    else:
        common.update(blocks=count_blocks(state, "blocks"))
    common.update({k: v for k, v in overrides.items() if v is not None})
    return (PartitionConfig if kind == "pgm" else MaskedDiffusionConfig).from_dict(common)


def read_official_text_checkpoint(path: Path, *, weights: str | None = "ema", content=None, **overrides):
    """(model in eval mode, hyper-parameters as plain data) from a released text checkpoint.
    `weights`: "ema" (the `shadow_params` average), "raw" (the state_dict), or None (the average
    when the file has one). `overrides` set config fields the file cannot tell (pre_query_mode,
    length, mask_token_id, num_heads). `content`: the file already read with `load_restricted`."""
    path = Path(path)
    if weights is not None:
        check_weights(weights)
    content = load_restricted(path) if content is None else content
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint of the paper's models (no state_dict)")
    hyper = to_plain(content.get("hyper_parameters") or {})
    hyper = hyper if isinstance(hyper, dict) else {}
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in strip_prefixes(content["state_dict"]).items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path} has no backbone.* tensors; it is not one of the paper's text checkpoints")
    try:
        config = infer_text_config(state, hyper, overrides)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    model = build_model(config)
    expected = model.state_dict()
    # inv_freq is a fixed function of the head dimension; older files may not carry it.
    state.setdefault("rotary_emb.inv_freq", expected["rotary_emb.inv_freq"])
    check_tensors(state, expected, f"{path}'s state_dict")
    ema = content.get("ema")
    has_ema = has_average(content)
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"{path} holds no EMA weights; import it with weights='raw'")
    if weights != "raw" and has_ema:
        names = official_parameter_order(config.kind, getattr(config, "encoder_blocks", getattr(config, "blocks", 0)),
                                         getattr(config, "decoder_blocks", 0), getattr(config, "query_processor", ""),
                                         getattr(config, "query_norm", ""))
        shadow = list(ema["shadow_params"])
        if len(shadow) != len(names):
            raise CheckpointError(f"the EMA holds {len(shadow)} tensors but the model has {len(names)} "
                                  "parameters")
        for name, tensor in zip(names, shadow):
            if tuple(tensor.shape) != tuple(state[name].shape):
                raise CheckpointError(f"EMA tensor for {name} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(state[name].shape)}")
        state = {**state, **dict(zip(names, shadow))}
    model.load_state_dict(float32(state))
    return model.eval(), hyper


def has_average(content) -> bool:
    """Whether a text checkpoint's content holds the EMA `shadow_params`."""
    ema = content.get("ema") if isinstance(content, dict) else None
    return isinstance(ema, dict) and isinstance(ema.get("shadow_params"), (list, tuple))


# ---------------------------------------------------------------------------------------------
# Image checkpoints: `torch.save({"iter", "global_epoch", "model_state_dict", ...})`
# ---------------------------------------------------------------------------------------------

IMAGE_HEADS = 16  # the released image models' heads: not readable from the weights
IMAGE_LENGTH = 1025  # the released image PGM's positions (BOS + 32 x 32 codes): nor this
IMAGE_OPTIONS = {"pgm": ("num_heads", "length", "pre_query_mode"), "maskgit": ("num_heads",)}


def _heads(state: dict, hidden: int, overrides: dict) -> int:
    if overrides.get("num_heads"):
        return overrides["num_heads"]
    if "rotary_emb.inv_freq" in state:
        return hidden // (2 * state["rotary_emb.inv_freq"].shape[0])
    return IMAGE_HEADS


def infer_image_pgm_config(state: dict, overrides: dict) -> PartitionConfig:
    """The class-conditional PGM of an image state_dict: the vocabulary (codes + mask + BOS), the
    classes (+ the null class), the registers, blocks and widths from the shapes."""
    vocab_size, hidden = shape_of(state, "vocab_embed.embedding")
    class_rows, cond_dim = shape_of(state, "cls_embed.embedding_table.weight")
    mlp_hidden = shape_of(state, "encoder.blocks.0.mlp.0.weight")[0]
    if mlp_hidden % hidden:
        raise CheckpointError(f"the MLP width {mlp_hidden} is not a multiple of the hidden size {hidden}")
    values = dict(vocab_size=vocab_size, length=overrides.get("length") or IMAGE_LENGTH, hidden_size=hidden,
                  num_heads=_heads(state, hidden, overrides), mlp_ratio=mlp_hidden // hidden, cond_dim=cond_dim,
                  dropout=0.1, mask_token_id=vocab_size - 2, num_classes=class_rows - 1,
                  registers=shape_of(state, "reg_tokens.weight")[0] if "reg_tokens.weight" in state else 0,
                  encoder_blocks=count_blocks(state, "encoder.blocks"),
                  decoder_blocks=count_blocks(state, "decoder.layers"),
                  pre_query_mode=overrides.get("pre_query_mode") or "learn+freqs",
                  query_processor="linear" if "decoder.group_swap.query_processor.weight" in state else "mlp4",
                  query_norm="layernorm" if "decoder.group_swap.pre_query_norm.bias" in state else "rmsnorm")
    return PartitionConfig(**values)


def infer_maskgit_config(state: dict, overrides: dict) -> MaskGITConfig:
    """The Halton-MaskGIT transformer of a state_dict: codebook, grid, depth, widths, classes, registers."""
    vocab_size, hidden = shape_of(state, "tok_emb.weight")
    cells = shape_of(state, "pos_emb.weight")[0]
    grid = math.isqrt(cells)
    if grid * grid != cells:
        raise CheckpointError(f"pos_emb has {cells} rows, which is not a square grid of codes")
    ffn = shape_of(state, "transformer.layers.0.ff.w1.weight")[0]
    values = dict(codebook_size=vocab_size - 1, grid_size=grid, hidden_size=hidden,
                  depth=count_blocks(state, "transformer.layers"), num_heads=overrides.get("num_heads") or IMAGE_HEADS,
                  mlp_dim=4 * hidden, num_classes=shape_of(state, "cls_emb.weight")[0] - 1,
                  registers=shape_of(state, "reg_tokens.weight")[0] if "reg_tokens.weight" in state else 0)
    config = MaskGITConfig(**values)
    if config.ffn_hidden != ffn:  # any mlp_dim whose SwiGLU width is `ffn`: 3/2 of it is one
        config = dataclasses.replace(config, mlp_dim=3 * ffn // 2)
    return config


def image_state(content) -> tuple[str, dict] | None:
    """("pgm" or "maskgit", state_dict) of an image checkpoint's content, or None."""
    if not isinstance(content, dict) or not isinstance(content.get("model_state_dict"), dict):
        return None
    state = strip_prefixes(content["model_state_dict"])
    if "tok_emb.weight" in state:
        return "maskgit", state
    if "cls_embed.embedding_table.weight" in state:
        return "pgm", state
    return None


def read_official_image_checkpoint(path: Path, *, weights: str | None = None, content=None, **overrides):
    """(the image PGM or the MaskGIT baseline in eval mode, its kind) from a released image
    checkpoint. They hold raw weights only (the authors trained without an average)."""
    path = Path(path)
    if weights not in (None, "raw"):
        check_weights(weights)
        raise CheckpointError(f"{path} holds raw weights only (the authors trained their image models without "
                              "an average): use weights='raw'")
    content = load_restricted(path) if content is None else content
    found = image_state(content)
    if found is None:
        raise CheckpointError(f"{path} is not one of the paper's image checkpoints (no model_state_dict of an "
                              "image PGM or MaskGIT)")
    kind, state = found
    unknown = sorted(set(overrides) - set(IMAGE_OPTIONS[kind]))
    if unknown:
        raise CheckpointError(f"{', '.join(unknown)} does not apply to a {kind} image checkpoint (it takes "
                              f"{', '.join(IMAGE_OPTIONS[kind])})")
    try:
        config = infer_image_pgm_config(state, overrides) if kind == "pgm" else infer_maskgit_config(state, overrides)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    with torch.device("meta"):
        model = build_model(config)
    expected = model.state_dict()
    if kind == "pgm":  # a fixed function of the head dimension, which older files may not carry
        state.setdefault("rotary_emb.inv_freq", Rotary(config.hidden_size // config.num_heads).inv_freq)
    check_tensors(state, expected, f"{path}'s model_state_dict")
    model = model.to_empty(device="cpu")
    if kind == "pgm":  # the non-persistent sinusoid of GroupSwap is not in the file: recompute it
        model.decoder.group_swap.reset_buffers()
    model.load_state_dict(float32(state))
    return model.eval(), kind


# ---------------------------------------------------------------------------------------------
# Any released file
# ---------------------------------------------------------------------------------------------

def checkpoint_kind(content) -> str | None:
    """"text", "pgm" or "maskgit" (image), "vq", or None: what a loaded file holds."""
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        return "text"
    found = image_state(content)
    if found is not None:
        return found[0]
    return "vq" if vq_state(content) is not None else None


@dataclasses.dataclass
class Released:
    """What `read_released_checkpoint` found: the model (in eval mode), its kind ("text", "pgm" or
    "maskgit" for images, "vq"), the weights it holds ("ema" or "raw") and the tokenizer it names."""

    model: torch.nn.Module
    kind: str
    weights: str
    tokenizer_name: str | None = None


def read_released_checkpoint(path: str | Path, *, weights: str | None = None, **overrides) -> Released:
    """Any released file: an authors' text or image checkpoint, or LlamaGen's VQ. What the file is
    comes from its content, never from its name; `weights` None takes the average where there is one."""
    path = Path(path)
    content = load_restricted(path)
    kind = checkpoint_kind(content)
    if kind is None:
        found = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(f"{path} is none of the released checkpoints this library reads (a text or image "
                              f"checkpoint of the paper, or LlamaGen's VQ); it holds {found}")
    if kind == "text":
        model, hyper = read_official_text_checkpoint(path, weights=weights, content=content, **overrides)
        name = lookup(hyper, "config.data.tokenizer_name_or_path")
        used = "ema" if weights != "raw" and has_average(content) else "raw"
        return Released(model, kind, used, name if isinstance(name, str) else None)
    if kind == "vq":
        if weights not in (None, "raw"):
            raise CheckpointError(f"{path} is a VQ tokenizer with one set of weights: use weights='raw'")
        image_size = overrides.pop("image_size", None) or VQ8_IMAGE_SIZE
        if overrides:
            raise CheckpointError(f"{', '.join(sorted(overrides))} does not apply to a VQ checkpoint (it takes "
                                  "image_size)")
        return Released(load_llamagen_vq(path, content=content, image_size=image_size), kind, "raw")
    model, kind = read_official_image_checkpoint(path, weights=weights, content=content, **overrides)
    return Released(model, kind, "raw")
