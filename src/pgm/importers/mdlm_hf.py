"""Directories in the layout of `kuleshov-group/mdlm-owt`, the MDLM authors' OpenWebText model on
the Hugging Face Hub, read without its transformers custom code.

Its config.json holds `model_type: "mdlm"` and the backbone's shape under the authors' names
(`hidden_dim`, `n_blocks`, ...) beside transformers' own keys; its weights (`model.safetensors`,
or `pytorch_model.bin` read through the restricted unpickler) hold the DiT under `backbone.`, with
the parameter names of the authors' Lightning checkpoints, which our MDLM module keeps (`official`).
What the file cannot tell is the released model's: an MLP four times as wide as the hidden size
(fixed in their DDiTBlock) and the mask id after the vocabulary's last real token (GPT-2's 50257
ids + the mask = their 50258).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..formats import CONFIG_FILE, WEIGHTS_FILE, load_weights, read_config_file
from ..models import MaskedDiffusionConfig, build_model
from .checks import check_tensors, float32, strip_prefixes
from .unpickling import load_restricted

MODEL_TYPE = "mdlm"
PICKLED_WEIGHTS_FILE = "pytorch_model.bin"  # what transformers writes with safe_serialization=False
PREFIX = "backbone."
TOKENIZER_NAME = "gpt2"  # mdlm-owt names no tokenizer of its own: its README loads GPT-2's

# config.json field -> MaskedDiffusionConfig field
FIELDS = {"vocab_size": "vocab_size", "model_length": "length", "hidden_dim": "hidden_size", "cond_dim": "cond_dim",
          "n_blocks": "blocks", "n_heads": "num_heads", "dropout": "dropout", "time_conditioning": "time_conditioning"}
# Keys that transformers' PretrainedConfig writes about itself and the custom code, not the network.
TRANSFORMERS_KEYS = {"model_type", "architectures", "auto_map", "return_dict", "torch_dtype", "dtype",
                     "transformers_version", "_name_or_path", "_attn_implementation_autoset", "use_cache",
                     "output_hidden_states", "output_attentions", "tie_word_embeddings", "bos_token_id",
                     "eos_token_id", "pad_token_id", "is_decoder", "is_encoder_decoder", "chunk_size_feed_forward"}
MLP_RATIO = 4  # their DDiTBlock's MLP width, not written in config.json


def is_transformers_config(values: dict) -> bool:
    """Whether a parsed config.json is transformers' (it names a model_type) rather than ours."""
    return "model" not in values and "model_type" in values


def mdlm_config(values: dict, where: Path) -> MaskedDiffusionConfig:
    """Our MDLM configuration for the transformers config `values` read from `where`."""
    if values.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{where} describes a transformers model of type {values.get('model_type')!r}; "
                              f"only kuleshov-group/mdlm-owt's type {MODEL_TYPE!r} is read")
    missing = [name for name in FIELDS if name not in values]
    if missing:
        raise CheckpointError(f"{where} has no {', '.join(missing)}, which an mdlm config.json holds")
    unknown = sorted(set(values) - set(FIELDS) - TRANSFORMERS_KEYS)
    if unknown:  # a field we do not read might change the network: never guess past it
        raise CheckpointError(f"{where} has field(s) {', '.join(unknown)} that mdlm-owt's config does not, "
                              "so its network may differ from the DiT this library builds")
    try:
        return MaskedDiffusionConfig.from_dict({ours: values[theirs] for theirs, ours in FIELDS.items()}
                                               | {"mlp_ratio": MLP_RATIO})
    except ConfigError as error:
        raise CheckpointError(f"{where}: {error}") from None


def read_weights(directory: Path) -> tuple[dict, Path]:
    """(state_dict, file) of the directory's weights: model.safetensors, else pytorch_model.bin."""
    safetensors_path, pickled_path = directory / WEIGHTS_FILE, directory / PICKLED_WEIGHTS_FILE
    if safetensors_path.is_file():
        return load_weights(safetensors_path), safetensors_path
    if pickled_path.is_file():
        state = load_restricted(pickled_path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{pickled_path} holds a {type(state).__name__}, not a state_dict")
        return state, pickled_path
    raise CheckpointError(f"{directory} has neither {WEIGHTS_FILE} nor {PICKLED_WEIGHTS_FILE} (a sharded "
                          "checkpoint is not read: merge its shards first)")


def read_mdlm_hf_directory(directory: str | Path, values: dict | None = None):
    """(our MDLM in eval mode, the file its weights came from) for a directory in mdlm-owt's layout;
    `values`: its config.json, already parsed. Every tensor is checked by name and shape."""
    directory = Path(directory)
    where = directory / CONFIG_FILE
    if values is None:
        values = read_config_file(directory, "a transformers model directory")
    config = mdlm_config(values, where)
    state, source = read_weights(directory)
    found = strip_prefixes(state)
    model = build_model(config)
    # Checked under the file's own names, so that a refusal names the tensors as they are in it.
    expected = {PREFIX + name: tensor for name, tensor in model.state_dict().items()}
    # inv_freq is a fixed function of the head dimension, which a file may leave out.
    found.setdefault(f"{PREFIX}rotary_emb.inv_freq", expected[f"{PREFIX}rotary_emb.inv_freq"])
    check_tensors(found, expected, str(source))
    model.load_state_dict(float32({name[len(PREFIX):]: tensor for name, tensor in found.items()}))
    return model.eval(), source


__all__ = ["FIELDS", "MODEL_TYPE", "PICKLED_WEIGHTS_FILE", "is_transformers_config", "mdlm_config",
           "read_mdlm_hf_directory"]
