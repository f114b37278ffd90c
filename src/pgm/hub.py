"""Pretrained models: our directory format, run directories, the authors' checkpoints, Hub ids.

A pretrained directory is `config.json` ({"model": {"kind": ..., ...}}) + `model.safetensors`
(+ `tokenizer/` where there is one). `from_pretrained` also accepts:
- a run directory from `pgm train` (its latest checkpoint, EMA weights by default);
- one of the authors' Lightning `.ckpt` files (imported on the fly, see `pgm.official`);
- a Hugging Face Hub id: `OWNER/REPO` for a repository in our format, or `OWNER/REPO/FILE.ckpt`
  for a released checkpoint such as `jdeschena/pgm/pgm_8_8.ckpt` (needs `huggingface_hub` and
  the network).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .models import build_model, config_from_dict
from .runs import (CHECKPOINTS, CONFIG_FILE, RunError, latest_checkpoint, load_checkpoint, load_weights,
                   read_config_file, write_atomic)

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


def save_pretrained(model: torch.nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Write `model` (and its tokenizer) as a pretrained directory; files are replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.savable_state().items()}
    temporary = directory / f".{WEIGHTS_FILE}.tmp-{os.getpid()}"
    save_file(state, str(temporary), metadata={"format": "pt"})
    os.replace(temporary, directory / WEIGHTS_FILE)
    write_atomic(directory / CONFIG_FILE, json.dumps({"model": model.config.to_dict()}, indent=2).encode())
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER_DIR)
    return directory


def load_pretrained_dir(directory: Path, weights: str = "ema"):
    """(model in eval mode, where the weights came from) for our directory or a run directory."""
    if weights not in ("ema", "raw"):
        raise RunError(f"weights must be 'ema' or 'raw', got {weights!r}")
    config_path = directory / CONFIG_FILE
    values = read_config_file(directory, "neither a pretrained nor a run directory")
    if not isinstance(values, dict) or "model" not in values:
        raise RunError(f"{config_path} has no model section")
    config = config_from_dict(values["model"])
    if (directory / CHECKPOINTS).is_dir():
        checkpoint = latest_checkpoint(directory)
        if checkpoint is None:
            raise RunError(f"{directory} has no checkpoint yet")
        loaded = load_checkpoint(checkpoint, optimizer=False)
        state = loaded["ema"] if weights == "ema" and loaded["ema"] is not None else loaded["model"]
        source = checkpoint
    else:
        source = directory / WEIGHTS_FILE
        if not source.is_file():
            raise RunError(f"{directory} has no {WEIGHTS_FILE}")
        state = load_weights(source)
    model = build_model(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise RunError(f"{source} does not fit the configuration in {config_path}: "
                       f"{str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else error}") from None
    return model.eval(), source


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:
        raise RunError(f"{hub_id!r} is not a local path, and downloading it needs huggingface_hub: "
                       "pip install 'partition-gm[hf]', or download the file yourself and pass its path") from None
    parts = hub_id.split("/")
    try:
        if len(parts) == 2:
            return Path(snapshot_download(hub_id))
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
    except Exception as error:
        raise RunError(f"could not download {hub_id!r} from the Hugging Face Hub ({type(error).__name__}); "
                       "without network access, download it elsewhere and pass the local path") from None


def from_pretrained(name_or_path: str | Path, *, weights: str = "ema", device=None, **import_options):
    """A model in eval mode from a local directory, run, `.ckpt` file, or Hub id (see module doc).
    `import_options` (pre_query_mode, length, mask_token_id, ...) apply to the authors' checkpoints."""
    from .official import read_official_text_checkpoint

    path = Path(name_or_path).expanduser()
    if not path.exists():
        text = str(name_or_path)
        if text.count("/") >= 1 and not text.startswith((".", "/", "~")):
            path = _download(text)
        else:
            raise RunError(f"{name_or_path} does not exist")
    if path.is_file():
        model, _ = read_official_text_checkpoint(path, weights=weights, **import_options)
    else:
        model, _ = load_pretrained_dir(path, weights)
    return model.to(device) if device is not None else model


def convert_official(checkpoint: str | Path, out_dir: str | Path, *, weights: str = "ema", gpt2_file: str | None = None,
                     **import_options) -> Path:
    """Import a released text checkpoint and write it in our format, with its tokenizer when
    the checkpoint names one we can build (GPT-2's, from a local file or tiktoken's cache)."""
    from .data.corpus import DataError
    from .data.tokenizers import GPT2Tokenizer
    from .official import lookup, read_official_text_checkpoint

    model, hyper = read_official_text_checkpoint(Path(checkpoint), weights=weights, **import_options)
    tokenizer = None
    name = lookup(hyper, "config.data.tokenizer_name_or_path")
    if isinstance(name, str) and name.startswith("gpt2"):
        try:
            tokenizer = GPT2Tokenizer(gpt2_file)
        except DataError:
            tokenizer = None
    out_dir = Path(out_dir)
    if (out_dir / CHECKPOINTS).exists():
        raise RunError(f"{out_dir} is a training run; choose another output directory")
    save_pretrained(model, out_dir, tokenizer)
    if tokenizer is None and isinstance(name, str) and name.startswith("gpt2"):
        # No local copy of GPT-2's BPE now: record the tokenizer; loading it finds the file later.
        GPT2Tokenizer.save_reference(out_dir / TOKENIZER_DIR)
    return out_dir
