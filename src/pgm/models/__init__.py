"""Model classes and their configurations, looked up by kind ("pgm", "mdlm", ...)."""

from ..config import ModelConfig
from ..errors import ConfigError
from .causal import CausalConfig, CausalTransformer
from .classifier import ClassifierConfig, FeatureClassifier
from .dit import MaskedDiffusionConfig, MaskedDiffusionTransformer
from .maskgit import MaskGITConfig, MaskGITTransformer
from .partition import PartitionConfig, PartitionTransformer
from .vq import VQConfig, VQModel

MODEL_CLASSES = {
    PartitionConfig.kind: PartitionTransformer,
    MaskedDiffusionConfig.kind: MaskedDiffusionTransformer,
    CausalConfig.kind: CausalTransformer,
    MaskGITConfig.kind: MaskGITTransformer,
    VQConfig.kind: VQModel,
    ClassifierConfig.kind: FeatureClassifier,
}


def config_from_dict(values: dict) -> ModelConfig:
    """Rebuild a model config from its JSON form, which names its `kind`."""
    if not isinstance(values, dict):
        raise ConfigError(f"a model configuration is a JSON object naming its kind, not a {type(values).__name__}")
    kind = values.get("kind")
    if kind not in MODEL_CLASSES:
        raise ConfigError(f"unknown model kind {kind!r}; known kinds: {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[kind].config_class.from_dict(values)


def is_image_model(config: ModelConfig) -> bool:
    """A class-conditional model of VQ codes: MaskGIT, or a PGM with classes."""
    return config.kind == "maskgit" or (config.kind == "pgm" and config.num_classes > 0)


def build_model(config: ModelConfig):
    return MODEL_CLASSES[config.kind](config)


__all__ = [
    "ConfigError", "ModelConfig", "PartitionConfig", "PartitionTransformer", "MaskedDiffusionConfig",
    "MaskedDiffusionTransformer", "CausalConfig", "CausalTransformer", "MaskGITConfig", "MaskGITTransformer",
    "VQConfig", "VQModel", "MODEL_CLASSES", "config_from_dict", "build_model", "is_image_model",
]
