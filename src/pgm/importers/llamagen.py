"""LlamaGen's released VQ checkpoints (VQ-8: `vq_ds8_c2i.pt`), loaded strictly into our `VQModel`,
whose module tree and parameter names are LlamaGen's.

The file is a `torch.save` dict whose "model" entry is the state_dict (LlamaGen's training script
also saves its argparse namespace, an optimizer and a discriminator beside it: read through the
restricted unpickler, those become inert records and nothing in the file runs). The shapes tell
the channels, the level multipliers, the residual blocks, the latent and codebook sizes; the image
size and the GroupNorm groups cannot be read from them (VQ-8: 256 and 32).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.vq import VQConfig, VQModel
from .checks import check_tensors, count_blocks, float32, shape_of, strip_prefixes
from .unpickling import load_restricted

VQ_KEY = "quantize.embedding.weight"  # the tensor that tells a VQ state_dict apart
VQ8_IMAGE_SIZE, VQ8_GROUPS = 256, 32  # what VQ-8's weights cannot tell


def infer_vq_config(state: dict, *, image_size: int = VQ8_IMAGE_SIZE, norm_groups: int = VQ8_GROUPS) -> VQConfig:
    """The `VQConfig` the shapes of a LlamaGen state_dict describe."""
    channels, in_channels = shape_of(state, "encoder.conv_in.weight")[:2]
    levels = count_blocks(state, "encoder.conv_blocks")
    widths = [shape_of(state, f"encoder.conv_blocks.{level}.res.0.conv1.weight")[0] for level in range(levels)]
    if any(width % channels for width in widths):
        raise CheckpointError(f"the encoder's level widths {widths} are not multiples of its {channels} channels")
    codebook_size, codebook_dim = shape_of(state, VQ_KEY)
    usage = state.get("quantize.codebook_used")
    values = dict(in_channels=in_channels, image_size=image_size, channels=channels,
                  channel_multipliers=[width // channels for width in widths],
                  encoder_res_blocks=count_blocks(state, "encoder.conv_blocks.0.res"),
                  decoder_res_blocks=count_blocks(state, "decoder.conv_blocks.0.res"),
                  z_channels=shape_of(state, "encoder.conv_out.weight")[0], codebook_size=codebook_size,
                  codebook_dim=codebook_dim, norm_groups=norm_groups)
    if isinstance(usage, torch.Tensor):
        values["codebook_usage_window"] = usage.shape[0]
    try:
        return VQConfig(**values)
    except ValueError as error:
        raise CheckpointError(f"the VQ checkpoint's shapes do not make a VQ model: {error}") from None


def vq_state(content) -> dict | None:
    """The VQ state_dict inside a loaded file's content, or None when it holds none."""
    if isinstance(content, dict) and isinstance(content.get("model"), dict):
        state = strip_prefixes(content["model"])
        return state if VQ_KEY in state else None
    return None


def load_llamagen_vq(path: str | Path, config: VQConfig | None = None, *, content=None,
                     image_size: int = VQ8_IMAGE_SIZE, norm_groups: int = VQ8_GROUPS) -> VQModel:
    """A `VQModel` (in eval mode) holding the weights of a LlamaGen VQ checkpoint. `config`
    defaults to what the shapes tell (with `image_size` and `norm_groups`, which they cannot);
    the load is strict. `content`: the file already read with `load_restricted`."""
    path = Path(path)
    content = load_restricted(path) if content is None else content
    state = vq_state(content)
    if state is None:
        found = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
        raise CheckpointError(f"{path} is not a LlamaGen VQ checkpoint: expected a dict with a 'model' "
                              f"state_dict holding {VQ_KEY}, found {found}")
    config = infer_vq_config(state, image_size=image_size, norm_groups=norm_groups) if config is None else config
    # Built without storage or random initialisation: the strict load below fills every tensor.
    with torch.device("meta"):
        model = VQModel(config)
    check_tensors(state, model.state_dict(), str(path))
    model = model.to_empty(device="cpu")
    model.load_state_dict(float32(state), strict=True)
    return model.eval()
