"""Images as rows of tokens, prepared once into a run directory.

Two image tokenizers:
- "pixels": a row is the image's uint8 pixels (what the VQ autoencoder trains on);
- "vq:RUN": a row is `[BOS, c_0 .. c_{N-1}]`, the codes of a trained VQ autoencoder (a run or
  pretrained directory) in raster order. Ids: codes 0..K-1, mask K, BOS K+1 (the authors'
  layout), so the PGM's vocabulary is K + 2 and MaskGIT's K + 1.

Encoding a dataset with a VQ model is done once: the rows are cached inside the VQ directory
under `token-cache/`, keyed by the data recipe and the weights, and copied from there into every
run that uses them (a PGM and a MaskGIT run share one encoding).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..formats import (DATA_DIR, TOKENIZER_CONFIG, TOKENIZER_DIR, make_directory, replaced_atomically,
                       replaced_directory, write_json)
from .image_sets import load_images
from .packing import dtype_for

CACHE_DIR = "token-cache"


class PixelTokenizer:
    """A row is an image's pixels: C * size * size values in 0..255."""

    kind = "pixels"
    bos_id = None

    def __init__(self, channels: int, image_size: int):
        self.channels, self.image_size = channels, image_size
        self.model_vocab_size, self.mask_id = 256, 0
        self.row_length = channels * image_size * image_size

    def encode(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1)

    def save(self, directory: Path) -> None:
        make_directory(directory)
        write_json(directory / TOKENIZER_CONFIG, {"type": self.kind, "channels": self.channels,
                                                  "image_size": self.image_size})


@dataclasses.dataclass
class VQCodes:
    """Rows of VQ codes: `[BOS, c_0 .. c_{N-1}]` with codes 0..K-1, the mask id K and the BOS K+1,
    over a `grid_size` x `grid_size` grid of an image of `channels` x `image_size`^2 pixels.

    This is the layout only: the VQ network that makes and decodes the codes is not data (see
    `pgm.vq_tokenizer`, which loads it from the same directory)."""

    codebook_size: int
    grid_size: int
    channels: int
    image_size: int

    kind = "vq"

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def bos_id(self) -> int:
        return self.codebook_size + 1

    @property
    def model_vocab_size(self) -> int:
        return self.codebook_size + 2

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def row_length(self) -> int:
        return 1 + self.num_tokens

    def layout(self) -> dict:
        return {"type": self.kind, "codebook_size": self.codebook_size, "grid_size": self.grid_size,
                "channels": self.channels, "image_size": self.image_size}


def load_image_tokenizer(directory: Path, config: dict):
    """The pixel tokenizer, or the layout of a VQ tokenizer's codes, saved in `directory`."""
    if config["type"] == "pixels":
        return PixelTokenizer(config["channels"], config["image_size"])
    missing = [key for key in ("codebook_size", "grid_size", "channels", "image_size") if key not in config]
    if missing:
        raise DataError(f"{directory / TOKENIZER_CONFIG} does not describe its VQ codes (no {', '.join(missing)}); "
                        "it was written by an older partition-gm: prepare the run's data again")
    return VQCodes(config["codebook_size"], config["grid_size"], config["channels"], config["image_size"])


def write_image_rows(rows: np.ndarray, labels: np.ndarray, path: Path, vocab_size: int) -> None:
    """rows [N, L] -> `path` (raw array) + `path.json` + `path.labels.npy`, as TokenRows reads them.
    Each file is written atomically, the rows last: rows that are there are complete."""
    write_json(f"{path}.json", {"rows": len(rows), "length": rows.shape[1], "dtype": dtype_for(vocab_size).name})
    with replaced_atomically(f"{path}.labels.npy") as temporary:
        np.save(temporary, labels.astype(np.int64))
    with replaced_atomically(path) as temporary:
        rows.astype(dtype_for(vocab_size)).tofile(temporary)


def split_images(config, train_split: bool):
    """(images, labels, class names) of the training or validation split of the data config, in a
    fixed shuffled order (so that `limit_images` and "the first N" cover every class)."""
    size, channels = config.image_size, config.channels
    options = dict(size=size, channels=channels, image_field=config.image_field, label_field=config.label_field)
    if config.source.startswith("hf:") or config.source == "fashion-mnist":
        aliases = {"validation": "test"} if config.source == "fashion-mnist" else {}  # its 10k test images
        same = aliases.get(config.split, config.split) == aliases.get(config.val_split, config.val_split)
        if same:
            raise DataError(f"the training split {config.split!r} and the validation split {config.val_split!r} "
                            "hold the same images")
        split = config.split if train_split else config.val_split
        images, labels, classes = load_images(config.source, split, **options)
    else:  # a folder: every val_every-th image is held out
        images, labels, classes = load_images(config.source, "all", **options)
        held_out = np.arange(len(images)) % config.val_every == config.val_every - 1
        keep = ~held_out if train_split else held_out
        images, labels = images[keep], labels[keep]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"the {'training' if train_split else 'validation'} images have labels outside "
                        f"[0, {len(classes)}) (unlabelled images cannot train a class-conditional model)")
    order = np.random.default_rng(0 if train_split else 1).permutation(len(images))
    if config.limit_images:
        order = order[:config.limit_images if train_split else max(1, config.limit_images // 4)]
    return images[order], labels[order], classes


def _cache_key(config, weights: Path) -> str:
    weights = Path(weights).resolve()
    recipe = {"data": {k: v for k, v in config.to_dict().items() if k != "tokenizer"},
              "weights": [str(weights), weights.stat().st_mtime_ns]}
    source = Path(config.source)
    if source.is_dir():  # a folder's images may change under the same name
        recipe["files"] = sorted((str(p.relative_to(source)), p.stat().st_size, p.stat().st_mtime_ns)
                                 for p in source.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def prepare_image_data(config, directory: Path, encoder=None, log=print) -> dict:
    """Tokenize both splits into `directory`/data and save the tokenizer; returns the meta dictionary.

    `encoder` turns uint8 images into rows: the pixel tokenizer (built here) for
    `tokenizer=pixels`; for `vq:DIR` the caller passes the VQ tokenizer (a network, which data
    does not build), and its rows are cached inside DIR, keyed by the recipe and the weights, so
    that every run on the same codes shares one encoding."""
    if config.tokenizer == "pixels":
        encoder = PixelTokenizer(config.channels, config.image_size)
    elif encoder is None or getattr(encoder, "kind", "") != "vq":
        raise DataError(f"data.tokenizer={config.tokenizer} needs its VQ tokenizer to encode the images")
    data_dir = directory / DATA_DIR
    make_directory(data_dir)
    cache = None
    if encoder.kind == "vq":
        cache = Path(config.tokenizer[3:]) / CACHE_DIR / _cache_key(config, encoder.source)
    counts, classes = {}, []
    for name, train_split in (("train", True), ("val", False)):
        target = (cache if cache is not None else data_dir) / f"{name}.bin"
        if cache is None or not target.is_file():
            images, labels, classes = split_images(config, train_split)
            log(f"data: tokenizing {len(images)} {name} images ({encoder.kind})")
            rows = encoder.encode(images)
            make_directory(target.parent)
            write_json(target.parent / "classes.json", classes)
            write_image_rows(rows, labels, target, encoder.model_vocab_size)
        if cache is not None:
            for suffix in ("", ".json", ".labels.npy"):
                shutil.copyfile(f"{target}{suffix}", data_dir / f"{name}.bin{suffix}")
            classes = json.loads((cache / "classes.json").read_text())
        counts[name] = int(np.load(data_dir / f"{name}.bin.labels.npy").shape[0])
    with replaced_directory(directory / TOKENIZER_DIR) as temporary:
        encoder.save(temporary)
    meta = {"modality": "image", "train_rows": counts["train"], "val_rows": counts["val"],
            "length": encoder.row_length, "classes": classes}
    log(f"data: {counts['train']} training and {counts['val']} validation images, rows of {encoder.row_length} "
        f"tokens, {len(classes)} classes")
    return meta
