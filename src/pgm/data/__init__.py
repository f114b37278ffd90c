"""Data: sources, tokenizers and packing, prepared once into a run directory."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Literal

import numpy as np

from ..config import Config, ConfigError, require
from ..formats import DATA_DIR, TOKENIZER_DIR, copy_directory, replaced_directory, write_json
from .corpus import BUILTIN, DataError, chunk_documents, load_documents, split_documents
from .image_tokens import PixelTokenizer, VQCodes, prepare_image_data
from .packing import TokenRows, pad_rows, wrap_rows, write_rows
from .tokenizers import Tokenizer, build_tokenizer, load_tokenizer


@dataclasses.dataclass
class DataConfig(Config):
    """Where the text comes from and how it becomes rows of tokens."""

    source: str = BUILTIN  # "builtin", a .txt/.jsonl file or folder, or "hf:NAME[:CONFIG]"
    text_field: str = "text"  # the field holding the text in .jsonl files and Hugging Face datasets
    split: str = "train"  # Hugging Face split to train on
    val_source: str = ""  # a separate validation source; empty: hold documents out of `source`
    val_split: str = "validation"  # Hugging Face split of val_source
    val_every: int = 20  # hold out every k-th document ...
    val_last: int = 0  # ... or, when > 0, the last N documents
    chunk_chars: int = 4000  # cut longer documents at paragraph breaks (0: never)
    limit_documents: int = 0  # keep only the first N documents (0: all)
    tokenizer: str = "bpe"  # "bpe" (trained on the training split), "gpt2", or "hf:NAME"
    vocab_size: int = 4096  # of the trained BPE
    gpt2_file: str = ""  # a local gpt2.tiktoken for offline use
    packing: Literal["wrap", "pad"] = "wrap"
    # Images (the tokenizer "pixels" or "vq:VQ_RUN_DIR"; source "fashion-mnist", a folder or hf:NAME):
    image_size: int = 32  # smaller images are zero-padded, larger ones resized and centre-cropped
    channels: int = 1  # 1 (grayscale) or 3 (RGB)
    image_field: str = "image"  # Hugging Face image datasets: the image and label fields
    label_field: str = "label"
    limit_images: int = 0  # keep only the first N training images (and N/4 validation images); 0: all

    @property
    def is_image(self) -> bool:
        return self.tokenizer == "pixels" or self.tokenizer.startswith("vq:")

    def validate(self) -> None:
        require(self.val_every >= 2, f"val_every must be at least 2, got {self.val_every}")
        require(self.val_last >= 0 and self.limit_documents >= 0 and self.chunk_chars >= 0,
                "val_last, limit_documents and chunk_chars must be non-negative")
        require(self.channels in (1, 3), f"channels must be 1 or 3, got {self.channels}")
        require(self.image_size >= 4 and self.limit_images >= 0, "image_size must be >= 4 and limit_images >= 0")


@dataclasses.dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: TokenRows
    val: TokenRows
    meta: dict



def training_and_validation_documents(config: DataConfig) -> tuple[list[str], list[str]]:
    """The text documents a run on `config` trains on and validates on: the validation source's,
    or a deterministic split of the training source's pieces."""
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
                 tokenizer: Tokenizer | None = None) -> PreparedData:
    """Read, split, tokenize and pack the data into `directory` (tokenizer/ and data/).
    `image_encoder`: the VQ tokenizer that encodes images for `data.tokenizer=vq:DIR` (see
    `prepare_image_data`). `tokenizer`: a text tokenizer to encode with instead of the one
    `config.tokenizer` describes (a distillation encodes with its teacher's)."""
    if config.is_image:
        meta = prepare_image_data(config, directory, image_encoder, log)
        meta["recipe"] = {"data": config.to_dict(), "length": length}
        write_json(directory / DATA_DIR / "meta.json", meta)
        return load_prepared(directory)
    if length < 3:
        raise ConfigError(f"rows of length {length} leave no room between BOS and EOS")
    train_docs, val_docs = training_and_validation_documents(config)
    log(f"data: {len(train_docs)} training and {len(val_docs)} validation documents "
        f"({sum(map(len, train_docs)) / 1e6:.1f}M / {sum(map(len, val_docs)) / 1e6:.2f}M characters)")
    if tokenizer is None:
        tokenizer = build_tokenizer(config.tokenizer, train_docs, config.vocab_size, config.gpt2_file or None)
        if config.tokenizer == "bpe" and tokenizer.vocab_size < config.vocab_size:
            raise DataError(f"the training text yields a BPE of only {tokenizer.vocab_size} tokens, fewer than "
                            f"data.vocab_size={config.vocab_size}: set data.vocab_size={tokenizer.vocab_size} or "
                            "less, or use more text")
    with replaced_directory(directory / TOKENIZER_DIR) as temporary:
        tokenizer.save(temporary)
    data_dir = directory / DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, docs in (("train", train_docs), ("val", val_docs)):
        encoded = (ids for start in range(0, len(docs), 1024) for ids in tokenizer.encode_batch(docs[start:start + 1024]))
        if config.packing == "wrap":
            rows = wrap_rows(encoded, length, tokenizer.bos_id, tokenizer.eos_id)
        else:
            rows = pad_rows(encoded, length, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        counts[name] = write_rows(rows, data_dir / f"{name}.bin", length, tokenizer.model_vocab_size,
                                  padded=config.packing == "pad")
        if counts[name] == 0:
            raise DataError(f"the {name} split yields no rows of length {length}: use more text or a shorter length")
    train, val = TokenRows(data_dir / "train.bin"), TokenRows(data_dir / "val.bin")
    meta = {"recipe": {"data": config.to_dict(), "length": length},
            "train_rows": counts["train"], "val_rows": counts["val"], "length": length,
            "unigram_val_nll": unigram_nll(train, val, tokenizer.model_vocab_size)}
    write_json(data_dir / "meta.json", meta)
    log(f"data: {counts['train']} training rows and {counts['val']} validation rows of {length} tokens; "
        f"unigram perplexity {math.exp(meta['unigram_val_nll']):.1f}")
    return PreparedData(tokenizer, train, val, meta)


def prepared_recipe(directory: Path) -> dict | None:
    """The recipe (data settings and row length) of the data prepared in `directory`, if any."""
    try:
        return json.loads((directory / DATA_DIR / "meta.json").read_text()).get("recipe")
    except (OSError, ValueError):
        return None


def link_prepared(source: Path, directory: Path) -> PreparedData:
    """The data another run prepared, in `directory` too: its tokenizer copied, its rows linked
    (hard links where the file system allows, copies elsewhere), each directory atomically."""
    copy_directory(source / TOKENIZER_DIR, directory / TOKENIZER_DIR)
    with replaced_directory(directory / DATA_DIR) as temporary:
        for path in (source / DATA_DIR).iterdir():
            if not path.is_file():
                continue
            try:
                os.link(path, temporary / path.name)
            except OSError:
                shutil.copy2(path, temporary / path.name)
    return load_prepared(directory)


def load_prepared(directory: Path) -> PreparedData:
    data_dir = directory / DATA_DIR
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise DataError(f"{directory} holds no prepared data (data/meta.json)") from None
    return PreparedData(load_tokenizer(directory / TOKENIZER_DIR), TokenRows(data_dir / "train.bin"),
                        TokenRows(data_dir / "val.bin"), meta)


def modeled_tokens(rows: TokenRows) -> np.ndarray:
    """The tokens a model is scored on: every valid position but the leading BOS."""
    if rows.lengths is None:
        return np.asarray(rows.array[:, 1:]).ravel()
    return np.concatenate([np.asarray(rows.array[i, 1:n]) for i, n in enumerate(rows.lengths)])


def unigram_nll(train: TokenRows, val: TokenRows, vocab_size: int) -> float:
    """Nats per validation token of the add-one-smoothed unigram distribution of the training tokens."""
    counts = np.bincount(modeled_tokens(train), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[modeled_tokens(val)].mean())


__all__ = ["DataConfig", "DataError", "PreparedData", "PixelTokenizer", "VQCodes", "prepare_data", "load_prepared",
           "link_prepared", "prepared_recipe", "Tokenizer", "TokenRows", "load_tokenizer", "unigram_nll"]
