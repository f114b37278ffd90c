"""`train.init_from`: a run that starts from another model's weights (weights only: the optimizer,
the schedule and the step start fresh).

The source is anything `from_pretrained` opens: a run, a pretrained directory, an authors'
checkpoint, an mdlm-owt directory, a Hub id. Its model must be of the run's kind and shape, with
two exceptions:
- the row length, for the text models (PGM, MDLM, AR), whose positions are rotary: nothing in
  their weights depends on it. The image models' rows are their code grids, fixed by the data.
- a larger vocabulary, with `train.init_resize_vocab=true`: the source's ids keep their rows, its
  mask row moves to the run's mask id, and the new ids start from the mean of the source's rows.
The data is encoded with the source's tokenizer (`data.tokenizer=init_from`), since its ids are
what the weights mean.
"""

from __future__ import annotations

import dataclasses

import torch

from .data import DataConfig, Tokenizer, load_tokenizer
from .data.tokenizers import build_tokenizer, named_tokenizer
from .errors import ConfigError
from .hub import from_pretrained
from .models import is_image_model
from .models.base import load_state

FROM_SOURCE = "init_from"  # data.tokenizer: the tokenizer of train.init_from
# Fields that may differ from the source's: the vocabulary (resized, or refused) and the training-only dropout.
FREE_FIELDS = ("vocab_size", "mask_token_id", "dropout")
ROTARY_KINDS = ("pgm", "mdlm", "ar")  # text models: no weight depends on the row length
DATA_FIELDS = ("length", "codebook_size", "grid_size")  # an image model's, decided by its VQ data


@dataclasses.dataclass
class InitialModel:
    """The model a run starts from, and the tokenizer its ids belong to (None: an image model's)."""

    source: str
    model: torch.nn.Module
    tokenizer: Tokenizer | None


def open_initial_model(source: str, weights: str, data: DataConfig) -> InitialModel:
    """The model of `train.init_from` (`weights`: "auto" for what it samples with, "ema" or "raw")."""
    model = from_pretrained(source, weights=None if weights == "auto" else weights)
    origin, tokenizer = model.origin, None
    if not is_image_model(model.config) and model.config.kind not in ("vq", "classifier"):
        if origin.tokenizer_dir is not None:
            tokenizer = load_tokenizer(origin.tokenizer_dir)
        elif origin.tokenizer_name:
            tokenizer = named_tokenizer(origin.tokenizer_name, data.gpt2_file or None)
    return InitialModel(source, model, tokenizer)


def starting_settings(data: DataConfig, model, initial: InitialModel, resize: bool, log=print):
    """(data, model) settings of a run that starts from `initial`, checked before any work: the data
    encoded with its tokenizer (unless the run names another one that is the same or, with
    `resize`, extends it), the vocabulary that tokenizer decides."""
    tokenizer = initial.tokenizer
    if tokenizer is not None and not data.is_image and data.tokenizer != FROM_SOURCE:
        if data.tokenizer == "bpe":  # a BPE trained anew would give the ids other meanings
            log(f"data: encoded with the tokenizer of {initial.source} (train.init_from), not a new BPE")
            data = data.replace(tokenizer=FROM_SOURCE)
        else:
            tokenizer = build_tokenizer(data.tokenizer, [], data.vocab_size, data.gpt2_file or None)
            if tokenizer.identity() != initial.tokenizer.identity() and not resize:
                raise ConfigError(f"data.tokenizer={data.tokenizer} is not the tokenizer {initial.source} was "
                                  "trained with: leave data.tokenizer out to encode with init_from's, or set "
                                  "train.init_resize_vocab=true for a tokenizer that extends it")
    if data.tokenizer == FROM_SOURCE:
        if initial.tokenizer is None:
            raise ConfigError(f"data.tokenizer=init_from: {initial.source} carries no tokenizer")
        model = model.replace(vocab_size=initial.model.config.vocab_size,
                              mask_token_id=initial.model.config.mask_token_id)
    elif tokenizer is not None and not data.is_image:
        model = model.replace(vocab_size=tokenizer.model_vocab_size, mask_token_id=tokenizer.mask_id)
    check_fits(initial, model, resize)
    return data, model


def check_fits(initial: InitialModel, run_model, resize: bool) -> None:
    """Refuse, in one sentence, a source whose model the run's cannot start from (see the module doc)."""
    source, run_kind = initial.model.config, run_model.kind
    where = f"train.init_from={initial.source}"
    def described(config) -> str:
        if config.kind in ("vq", "classifier"):
            return f"a {config.kind} model"
        return f"{'an image' if is_image_model(config) else 'a text'} {config.kind} model"

    if described(source) != described(run_model):
        raise ConfigError(f"{where} holds {described(source)}; this run trains {described(run_model)}")
    mine, theirs = run_model.to_dict(), source.to_dict()
    if is_image_model(source):  # the data decides these (and `load_initial_state` checks the tensors)
        free = FREE_FIELDS + DATA_FIELDS
        mine = {key: value for key, value in mine.items() if key not in ("vocab_size", "mask_token_id")}
    else:
        free = FREE_FIELDS + (("length",) if run_kind in ROTARY_KINDS else ())
    differing = [key for key in theirs if key not in free and theirs[key] != mine.get(key)]
    if differing:
        settings = " ".join(f"model.{key}={theirs[key]}" for key in differing)
        raise ConfigError(f"{where} has another shape than this run's model ({', '.join(differing)}): set {settings}")
    vocabulary, theirs_vocabulary = mine.get("vocab_size"), theirs.get("vocab_size")
    if vocabulary is not None and vocabulary < theirs_vocabulary:
        raise ConfigError(f"this run's vocabulary ({vocabulary} ids) is smaller than that of {where} "
                          f"({theirs_vocabulary}): a vocabulary can grow, not shrink")
    if vocabulary is not None and vocabulary > theirs_vocabulary and not resize:
        raise ConfigError(f"this run's vocabulary ({vocabulary} ids) is larger than that of {where} "
                          f"({theirs_vocabulary}): set train.init_resize_vocab=true to add rows initialised from "
                          "the mean embedding")


def initial_state(initial: InitialModel, run_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The source's weights as a state of `run_model` (checked by `check_fits`): vocabulary rows
    moved and added where the run's vocabulary is larger."""
    source, target = initial.model.config, run_model.config
    state = initial.model.state_dict()
    old, new = getattr(source, "vocab_size", None), getattr(target, "vocab_size", None)
    if old != new and not is_image_model(source):  # an image model's codes are its VQ data's: checked by shape
        state = {name: _grown_rows(tensor, old, new, source.mask_token_id, target.mask_token_id)
                 if tensor.ndim and tensor.shape[0] == old else tensor for name, tensor in state.items()}
    return state


def _grown_rows(tensor: torch.Tensor, old: int, new: int, old_mask: int, new_mask: int) -> torch.Tensor:
    """A [old, ...] vocabulary tensor as [new, ...]: each id keeps its row, the mask row moves to
    `new_mask`, and the ids new to the vocabulary take the mean of the source's other rows."""
    kept = torch.ones(old, dtype=torch.bool)
    kept[old_mask] = False
    grown = tensor[kept].mean(0, keepdim=True).expand(new, *tensor.shape[1:]).clone()
    ids = torch.arange(old)[kept]
    grown[ids] = tensor[ids]
    grown[new_mask] = tensor[old_mask]
    return grown


def load_initial_state(initial: InitialModel, run_model: torch.nn.Module) -> None:
    """Put the source's weights into `run_model`; a tensor whose shape depends on the row length
    (learned positions) is refused by name."""
    state = initial_state(initial, run_model)
    expected = run_model.state_dict()
    for name, tensor in state.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise ConfigError(f"train.init_from={initial.source}: {name} is {tuple(tensor.shape)} there and "
                              f"{tuple(expected[name].shape)} in this run (an image model's grid and codebook are "
                              "fixed by its weights: train on the VQ codes it was trained on)")
    try:
        load_state(run_model, state)
    except ValueError as error:
        raise ConfigError(f"train.init_from={initial.source} does not fit this run's model: {error}") from None
