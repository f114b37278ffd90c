"""Checkpoints released by others, imported into our models without their code: the authors'
text checkpoints (`official`) and LlamaGen's VQ tokenizer (`llamagen`), read without executing
anything pickled in them (`unpickling`)."""

from .llamagen import load_llamagen_vq
from .official import official_parameter_order, read_official_text_checkpoint
from .unpickling import CheckpointImportError

__all__ = ["CheckpointImportError", "load_llamagen_vq", "official_parameter_order", "read_official_text_checkpoint"]
