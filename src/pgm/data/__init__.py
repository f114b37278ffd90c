"""Data: sources, tokenizers and packing, prepared once into a data directory (`pgm prepare`) or
into the run that trains on them."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from ..errors import DataError
from ..formats import DATA_DIR, TOKENIZER_DIR, copy_directory, replaced_directory, write_json
from .config import DataConfig, recipe_differences
from .corpus import BUILTIN, chunk_documents, load_documents, split_documents
from .image_rows import PixelTokenizer, VQCodes, prepare_image_data
from .packing import TokenRows
from .pairs import prepare_pairs
from .prepare import META_FILE, prepare_text, prepared_meta, same_recipe, unigram_nll, usable_cores
from .tokenizers import Tokenizer, load_tokenizer


@dataclasses.dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: TokenRows
    val: TokenRows
    meta: dict


def training_and_validation_documents(config: DataConfig) -> tuple[list[str], list[str]]:
    """The text documents a run on `config` trains on and validates on, as lists (small sources:
    the built-in corpus, tests): the validation source's, or a deterministic split of the training
    source's pieces, by the rule that preparation applies as the pieces stream by."""
    documents = load_documents(config.source, config.text_field, config.split)
    if not config.val_source:
        return split_documents(documents, chunk_chars=config.chunk_chars, val_every=config.val_every,
                               val_last=config.val_last, limit=config.limit_documents)
    train_docs = chunk_documents(documents, config.chunk_chars, config.limit_documents)
    val_docs = chunk_documents(load_documents(config.val_source, config.text_field, config.val_split),
                               config.chunk_chars)
    if not train_docs or not val_docs:
        raise DataError("the training or the validation source holds no text")
    return train_docs, val_docs


def prepare_data(config: DataConfig, length: int, directory: Path, log=print, image_encoder=None,
                 tokenizer: Tokenizer | None = None, **options) -> PreparedData:
    """Read, split, tokenize and pack the data into `directory` (tokenizer/ and data/), replacing
    data of another recipe there. `image_encoder`: the VQ tokenizer that encodes images for
    `data.tokenizer=vq:DIR` (see `prepare_image_data`). `tokenizer`: a text tokenizer to encode
    with instead of the one `config.tokenizer` describes (a distillation encodes with its
    teacher's). `options`: `Preparation`'s (workers, progress, ...)."""
    if config.is_image:
        meta = prepare_image_data(config, directory, image_encoder, log)
        meta["recipe"] = config.recipe(length)
        write_json(directory / DATA_DIR / META_FILE, meta)
    elif config.format == "pairs":
        prepare_pairs(config, length, directory, tokenizer=tokenizer, log=log)
    else:
        prepare_text(config, length, directory, tokenizer=tokenizer, log=log, replace=True, **options)
    return load_prepared(directory)


def prepared_recipe(directory: Path) -> dict | None:
    """The recipe (data settings and row length) of the data prepared in `directory`, if any."""
    meta = prepared_meta(directory)
    return None if meta is None else meta.get("recipe")


def check_prepared(directory: str | Path, config: DataConfig, length: int) -> Path:
    """The data directory `data.prepared` names, once it is finished and its recipe is the run's."""
    directory = Path(directory).expanduser()
    meta = prepared_meta(directory)
    if meta is None:
        progress = (directory / DATA_DIR / "progress.json").is_file()
        raise DataError(f"data.prepared={directory} " + ("is not finished: run its pgm prepare command again to "
                                                         "complete it" if progress else
                                                         "holds no prepared data (make it with pgm prepare)"))
    if not same_recipe(meta.get("recipe"), config.recipe(length)):
        differences = "; ".join(recipe_differences(config.recipe(length), meta.get("recipe") or {}))
        raise DataError(f"data.prepared={directory} was prepared with another recipe than this run's: {differences}")
    return directory.resolve()


def data_directory(run_dir: Path, config: DataConfig) -> Path:
    """Where the rows of a run live: the data directory it was given, or the run itself."""
    return Path(config.prepared) if config.prepared else Path(run_dir)


def link_prepared(source: Path, directory: Path) -> PreparedData:
    """The data another run prepared, in `directory` too: its tokenizer copied, its rows linked
    (hard links where the file system allows, copies elsewhere), each directory atomically."""
    copy_directory(source / TOKENIZER_DIR, directory / TOKENIZER_DIR)
    with replaced_directory(directory / DATA_DIR) as temporary:
        for path in (source / DATA_DIR).iterdir():
            if not path.is_file() or path.name.startswith("."):
                continue
            try:
                os.link(path, temporary / path.name)
            except OSError:
                shutil.copy2(path, temporary / path.name)
    return load_prepared(directory)


def load_prepared(directory: Path) -> PreparedData:
    """The finished data of a data or run directory (shards listed by its meta; a run of an
    earlier version: its train.bin and val.bin)."""
    data_dir = Path(directory) / DATA_DIR
    meta = prepared_meta(directory)
    if meta is None:
        raise DataError(f"{directory} holds no prepared data (data/{META_FILE})")
    try:
        splits = [TokenRows([data_dir / name for name in meta["splits"][split]["shards"]]) if "splits" in meta
                  else TokenRows(data_dir / f"{split}.bin") for split in ("train", "val")]
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"the prepared data in {directory} is damaged ({error}); prepare it again") from None
    return PreparedData(load_tokenizer(Path(directory) / TOKENIZER_DIR), *splits, meta)


__all__ = ["DataConfig", "DataError", "PreparedData", "PixelTokenizer", "VQCodes", "prepare_data", "load_prepared",
           "link_prepared", "prepared_recipe", "check_prepared", "data_directory", "Tokenizer", "TokenRows",
           "load_tokenizer", "prepared_meta", "same_recipe", "unigram_nll", "usable_cores", "BUILTIN"]
