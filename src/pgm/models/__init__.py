"""Model classes and their configurations, looked up by kind ("pgm", "mdlm", ...)."""

from ..config import ConfigError, ModelConfig
from .causal import CausalConfig, CausalTransformer
from .dit import MaskedDiffusionConfig, MaskedDiffusionTransformer
from .partition import PartitionConfig, PartitionTransformer

MODEL_CLASSES = {
    PartitionConfig.kind: PartitionTransformer,
    MaskedDiffusionConfig.kind: MaskedDiffusionTransformer,
    CausalConfig.kind: CausalTransformer,
}


def config_from_dict(values: dict) -> ModelConfig:
    """Rebuild a model config from its JSON form, which names its `kind`."""
    kind = values.get("kind")
    if kind not in MODEL_CLASSES:
        raise ConfigError(f"unknown model kind {kind!r}; known kinds: {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[kind].config_class.from_dict(values)


def build_model(config: ModelConfig):
    return MODEL_CLASSES[config.kind](config)


__all__ = [
    "ConfigError", "ModelConfig", "PartitionConfig", "PartitionTransformer", "MaskedDiffusionConfig",
    "MaskedDiffusionTransformer", "CausalConfig", "CausalTransformer", "MODEL_CLASSES", "config_from_dict", "build_model",
]
