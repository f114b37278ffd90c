"""partition-gm: Partition Generative Models and the baselines they are measured against."""

from .models import (MaskedDiffusionConfig, MaskedDiffusionTransformer, PartitionConfig, PartitionTransformer,
                     build_model, config_from_dict)
from .objectives import LogLinearSchedule, MaskedDiffusionObjective, PartitionObjective
from .sampling import SamplingOptions, sample_mdlm, sample_pgm


def from_pretrained(name_or_path, **options):
    """A model from a pretrained or run directory, an authors' `.ckpt`, or a Hub id (see pgm.hub)."""
    from .hub import from_pretrained as load

    return load(name_or_path, **options)

__version__ = "0.1.0"

__all__ = [
    "MaskedDiffusionConfig", "MaskedDiffusionTransformer", "PartitionConfig", "PartitionTransformer",
    "build_model", "config_from_dict", "LogLinearSchedule", "MaskedDiffusionObjective", "PartitionObjective",
    "SamplingOptions", "sample_mdlm", "sample_pgm", "from_pretrained", "__version__",
]
