"""Pretrained models: our directory format, run directories, the authors' checkpoints, Hub ids.

A pretrained directory is `config.json` ({"model": {"kind": ..., ...}}) + `model.safetensors`
+ `README.md` (its model card) + `tokenizer/` where there is one (see `pgm.formats`).
`from_pretrained` also accepts:
- a run directory from `pgm train` (its latest checkpoint, EMA weights by default);
- a released checkpoint file: the authors' text (Lightning `.ckpt`) and image models, LlamaGen's
  VQ (imported on the fly, see `pgm.importers`);
- a directory in the transformers layout of `kuleshov-group/mdlm-owt` (config.json with
  `model_type: "mdlm"`, `model.safetensors` or `pytorch_model.bin`), with GPT-2's tokenizer named;
- a Hugging Face Hub id: `OWNER/REPO` for a repository in our format or mdlm-owt's, or
  `OWNER/REPO/FILE.ckpt` for a released checkpoint such as `jdeschena/pgm/pgm_8_8.ckpt` (needs
  `huggingface_hub` and the network), at a `revision` (branch, tag or commit) and with a `token`
  for private repositories when given.
Every loaded model carries its `origin`: the tokenizer it goes with, its run, its model card.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ArgumentError, CheckpointError, MissingDependency, RunError
from .formats import TOKENIZER_DIR, WEIGHTS_FILE, Origin, check_weights, load_weights, read_config_file
from .importers import is_transformers_config, read_mdlm_hf_directory, read_released_checkpoint
from .importers.mdlm_hf import TOKENIZER_NAME as MDLM_HF_TOKENIZER
from .models import build_model, config_from_dict
from .models.base import load_state
from .runs import CHECKPOINTS, checkpoint_weights, latest_checkpoint, run_card


def load_pretrained_dir(directory: str | Path, weights: str | None = None):
    """(model in eval mode, the file or checkpoint its weights came from) for our directory or a
    run directory (its latest checkpoint). `weights`: "ema" or "raw" for a run's averaged or raw
    weights, None for the average when the run kept one; a pretrained directory holds one set."""
    if weights is not None:
        check_weights(weights)
    directory = Path(directory)
    values = read_config_file(directory, "a pretrained or run directory")
    if is_transformers_config(values):
        return load_transformers_dir(directory, values, weights)
    if "model" not in values:
        raise CheckpointError(f"{directory / 'config.json'} has no model section")
    try:
        config = config_from_dict(values["model"])
    except ValueError as error:  # ConfigError: a saved configuration that does not read, so say which file
        raise CheckpointError(f"{directory / 'config.json'} is damaged: {error}") from None
    run_dir = None
    if (directory / CHECKPOINTS).is_dir():
        checkpoint = latest_checkpoint(directory)
        if checkpoint is None:
            raise RunError(f"{directory} has no checkpoint yet")
        state, averaged = checkpoint_weights(checkpoint, weights)
        source, run_dir = checkpoint, directory
        card = run_card(directory, checkpoint, "ema" if averaged else "raw")
    else:
        source = directory / WEIGHTS_FILE
        state = load_weights(source)
        card = values.get("card", {})
        if not isinstance(card, dict):
            raise CheckpointError(f"{directory / 'config.json'} is damaged: its card is a JSON {type(card).__name__}, "
                                  "not an object")
        if weights is not None and card.get("weights") != weights:
            raise CheckpointError(f"{directory} holds one set of weights ({card.get('weights') or 'unnamed'}), not "
                                  f"{weights} ones: leave the choice of weights out")
    model = build_model(config)
    try:
        load_state(model, state)
    except ValueError as error:
        raise CheckpointError(f"{source} does not fit the configuration in {directory / 'config.json'}: "
                              f"{error}") from None
    tokenizer_dir = directory / TOKENIZER_DIR
    model.origin = Origin(source=str(source), tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None,
                          tokenizer_name=values.get("tokenizer"), run_dir=run_dir, card=card)
    return model.eval(), source


def load_transformers_dir(directory: Path, values: dict, weights: str | None = None):
    """(model in eval mode, its weights file) for a directory in kuleshov-group/mdlm-owt's transformers
    layout (`values`: its config.json); it names GPT-2's tokenizer, found when the model is loaded."""
    if weights is not None:
        raise CheckpointError(f"{directory} holds one set of weights (a transformers model directory), not {weights} "
                              "ones: leave the choice of weights out")
    model, source = read_mdlm_hf_directory(directory, values)
    described = f"{directory.name} (an MDLM in kuleshov-group/mdlm-owt's transformers layout)"
    model.origin = Origin(source=str(source), tokenizer_name=MDLM_HF_TOKENIZER, card={"source": described})
    return model, source


def is_transformers_directory(path: Path) -> bool:
    """Whether `path` is a directory whose config.json is transformers' (names a model_type), not ours."""
    try:
        return is_transformers_config(read_config_file(path))
    except CheckpointError:
        return False


def read_checkpoint_file(path: Path, weights: str | None = None, **import_options):
    """A released checkpoint file (the authors' text or image models, LlamaGen's VQ) as a model in
    eval mode, with its origin."""
    released = read_released_checkpoint(path, weights=weights, **import_options)
    released.model.origin = Origin(source=str(path), tokenizer_name=released.tokenizer_name,
                                   card={"weights": released.weights, "source": f"{path.name} (a released checkpoint)"})
    return released.model


def _download(hub_id: str, revision: str | None = None, token: str | None = None) -> Path:
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:
        raise MissingDependency(f"{hub_id!r} is not a local path, and downloading it needs huggingface_hub: "
                                "pip install 'partition-gm[hf]', or download the file yourself and pass its "
                                "path") from None
    parts = hub_id.split("/")
    try:
        if len(parts) == 2:
            return Path(snapshot_download(hub_id, revision=revision, token=token))
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), revision=revision, token=token))
    except Exception as error:
        at = f" at revision {revision!r}" if revision is not None else ""
        raise RunError(f"could not download {hub_id!r}{at} from the Hugging Face Hub ({type(error).__name__}); "
                       "without network access, download it elsewhere and pass the local path") from None


def resolve_source(name_or_path: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local path for a directory, a checkpoint file or a Hub id (downloaded at `revision`, with
    `token`, which apply to Hub ids only)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if revision is not None or token is not None:
            given = [name for name, value in (("revision", revision), ("token", token)) if value is not None]
            raise ArgumentError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to Hub ids only, "
                                f"and {name_or_path} is a local path: leave {'them' if len(given) > 1 else 'it'} out")
        return path
    text = str(name_or_path)
    if text.count("/") >= 1 and not text.startswith((".", "/", "~")):
        return _download(text, revision, token)
    raise CheckpointError(f"{name_or_path} does not exist")


def from_pretrained(name_or_path: str | Path, *, weights: str | None = None, device=None, revision: str | None = None,
                    token: str | None = None, **import_options):
    """A model in eval mode from a local directory, run, `.ckpt` file, or Hub id (see module doc).
    `revision` and `token` apply to Hub ids; `import_options` (pre_query_mode, length,
    mask_token_id, ...) to the authors' checkpoints."""
    path = resolve_source(name_or_path, revision, token)
    if path.is_file():
        model = read_checkpoint_file(path, weights, **import_options)
    else:
        if import_options:
            raise ArgumentError(f"{', '.join(sorted(import_options))} apply to the authors' checkpoint files, "
                                f"not to the directory {path}")
        model, _ = load_pretrained_dir(path, weights)
    return model.to(device) if device is not None else model
