"""partition-gm: Partition Generative Models and the baselines they are measured against.

    import pgm
    pipe = pgm.load("runs/text-small")      # a run, a pretrained directory, a checkpoint or a Hub id
    print(pipe.generate(prompt="The Emperor Napoleon", steps=32)[0])
"""

from .errors import (ArgumentError, CheckpointError, ConfigError, DataError, MissingDependency, PGMError, PublishError,
                     ResourceError, RunError, SamplingError)
from .hub import from_pretrained
from .models import (MaskedDiffusionConfig, MaskedDiffusionTransformer, PartitionConfig, PartitionTransformer,
                     build_model, config_from_dict)
from .objectives import LogLinearSchedule, MaskedDiffusionObjective, PartitionObjective
from .pipeline import GenerationRequest, Pipeline, Samples, StepEvent, Stream, load
from .sampling import SamplingOptions, sample_mdlm, sample_pgm

__version__ = "0.1.0"

__all__ = [
    "load", "Pipeline", "GenerationRequest", "Samples", "StepEvent", "Stream", "from_pretrained",
    "MaskedDiffusionConfig", "MaskedDiffusionTransformer", "PartitionConfig", "PartitionTransformer",
    "build_model", "config_from_dict", "LogLinearSchedule", "MaskedDiffusionObjective", "PartitionObjective",
    "SamplingOptions", "sample_mdlm", "sample_pgm", "__version__",
    "PGMError", "ConfigError", "ArgumentError", "SamplingError", "DataError", "RunError", "CheckpointError",
    "PublishError", "MissingDependency", "ResourceError",
]
