"""Checkpoints released by others, imported into our models without their code: the authors'
text and image checkpoints (`official`), LlamaGen's VQ tokenizer (`llamagen`) and directories in
the layout of kuleshov-group/mdlm-owt, the MDLM authors' transformers model (`mdlm_hf`), all read
without executing anything pickled in them (`unpickling`), their tensors checked by name and
shape (`checks`). `read_released_checkpoint` tells which of them a file is from its content."""

from .llamagen import load_llamagen_vq
from .mdlm_hf import is_transformers_config, read_mdlm_hf_directory
from .official import (checkpoint_kind, official_parameter_order, read_official_image_checkpoint,
                       read_official_text_checkpoint, read_released_checkpoint)
from .unpickling import load_restricted

__all__ = ["checkpoint_kind", "is_transformers_config", "load_llamagen_vq", "load_restricted", "official_parameter_order",
           "read_mdlm_hf_directory", "read_official_image_checkpoint", "read_official_text_checkpoint",
           "read_released_checkpoint"]
