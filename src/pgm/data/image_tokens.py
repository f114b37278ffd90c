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

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .corpus import DataError
from .images import load_images, to_unit_range
from .packing import dtype_for
from ..runs import write_atomic

TOKENIZER_CONFIG = "tokenizer_config.json"
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
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(
            {"type": self.kind, "channels": self.channels, "image_size": self.image_size}, indent=2))


class VQTokenizer:
    """A trained VQ autoencoder: images -> `[BOS, codes]` rows and codes -> images."""

    kind = "vq"

    def __init__(self, model):
        self.model = model.eval()
        config = model.config
        self.codebook_size = config.codebook_size
        self.mask_id, self.bos_id = config.codebook_size, config.codebook_size + 1
        self.model_vocab_size = config.codebook_size + 2
        self.grid_size, self.num_tokens = config.grid_size, config.num_tokens
        self.channels, self.image_size = config.in_channels, config.image_size
        self.row_length = 1 + self.num_tokens

    @torch.no_grad()
    def encode(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 [N, C, H, W] -> rows [N, 1 + grid^2] (BOS first)."""
        device = next(self.model.parameters()).device
        rows = np.empty((len(images), self.row_length), dtype=np.int64)
        rows[:, 0] = self.bos_id
        for start in range(0, len(images), batch_size):
            batch = to_unit_range(images[start:start + batch_size]).to(device)
            rows[start:start + len(batch), 1:] = self.model.encode(batch).cpu().numpy()
        return rows

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, grid^2] -> images [B, C, H, W] in [-1, 1] (clamped)."""
        device = next(self.model.parameters()).device
        return self.model.decode_codes(codes.to(device)).clamp(-1, 1)

    def save(self, directory: Path) -> None:
        from ..hub import save_pretrained

        save_pretrained(self.model, directory)
        (directory / TOKENIZER_CONFIG).write_text(json.dumps({"type": self.kind}, indent=2))


def load_image_tokenizer(directory: Path, config: dict):
    if config["type"] == "pixels":
        return PixelTokenizer(config["channels"], config["image_size"])
    from ..hub import load_pretrained_dir

    model, _ = load_pretrained_dir(directory)
    return VQTokenizer(model)


def build_image_tokenizer(spec: str, channels: int, image_size: int):
    if spec == "pixels":
        return PixelTokenizer(channels, image_size)
    if not spec.startswith("vq:"):
        raise DataError(f"image data needs the tokenizer 'pixels' or 'vq:VQ_RUN_DIR', not {spec!r}")
    from ..hub import load_pretrained_dir
    from ..runs import RunError

    path = Path(spec[3:])
    try:
        model, source = load_pretrained_dir(path)
    except RunError as error:
        raise DataError(f"the VQ tokenizer {path} cannot be loaded ({error}); train it first with "
                        f"`pgm train --preset fmnist-vq --out {path}`") from None
    if model.config.kind != "vq":
        raise DataError(f"{path} holds a {model.config.kind} model, not a VQ autoencoder")
    if (model.config.in_channels, model.config.image_size) != (channels, image_size):
        raise DataError(f"the VQ model in {path} reads {model.config.in_channels}x{model.config.image_size}px images "
                        f"but the data is {channels}x{image_size}px")
    tokenizer = VQTokenizer(model)
    tokenizer.source = source  # the weights' path: part of the cache key
    return tokenizer


def write_image_rows(rows: np.ndarray, labels: np.ndarray, path: Path, vocab_size: int) -> None:
    """rows [N, L] -> `path` (raw array) + `path.json` + `path.labels.npy`, as TokenRows reads them."""
    rows.astype(dtype_for(vocab_size)).tofile(path)
    Path(f"{path}.json").write_text(json.dumps({"rows": len(rows), "length": rows.shape[1],
                                                "dtype": dtype_for(vocab_size).name}))
    np.save(f"{path}.labels.npy", labels.astype(np.int64))


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


def _cache_key(config, tokenizer) -> str:
    weights = Path(tokenizer.source).resolve()
    recipe = {"data": {k: v for k, v in config.to_dict().items() if k != "tokenizer"},
              "weights": [str(weights), weights.stat().st_mtime_ns]}
    source = Path(config.source)
    if source.is_dir():  # a folder's images may change under the same name
        recipe["files"] = sorted((str(p.relative_to(source)), p.stat().st_size, p.stat().st_mtime_ns)
                                 for p in source.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def prepare_image_data(config, directory: Path, log=print) -> dict:
    """Tokenize both splits into `directory`/data (through the VQ cache) and save the tokenizer;
    returns the meta dictionary."""
    from . import DATA_DIR, TOKENIZER_DIR

    tokenizer = build_image_tokenizer(config.tokenizer, config.channels, config.image_size)
    data_dir = directory / DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    cache = None
    if isinstance(tokenizer, VQTokenizer):
        cache = Path(config.tokenizer[3:]) / CACHE_DIR / _cache_key(config, tokenizer)
    counts, classes = {}, []
    for name, train_split in (("train", True), ("val", False)):
        cached = cache / f"{name}.bin" if cache else None
        if cached is None or not cached.is_file():
            images, labels, classes = split_images(config, train_split)
            log(f"data: tokenizing {len(images)} {name} images ({tokenizer.kind})")
            rows = tokenizer.encode(images)
            target = cached if cached is not None else data_dir / f"{name}.bin"
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(target.parent / "classes.json", json.dumps(classes).encode())
            temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            write_image_rows(rows, labels, temporary, tokenizer.model_vocab_size)
            for suffix in (".json", ".labels.npy"):  # the companions first, the rows last: rows mean complete
                os.replace(f"{temporary}{suffix}", f"{target}{suffix}")
            os.replace(temporary, target)
        if cached is not None:
            for suffix in ("", ".json", ".labels.npy"):
                shutil.copyfile(f"{cached}{suffix}", data_dir / f"{name}.bin{suffix}")
            classes = json.loads((cache / "classes.json").read_text())
        counts[name] = int(np.load(data_dir / f"{name}.bin.labels.npy").shape[0])
    tokenizer.save(directory / TOKENIZER_DIR)
    meta = {"modality": "image", "train_rows": counts["train"], "val_rows": counts["val"],
            "length": tokenizer.row_length, "classes": classes}
    log(f"data: {counts['train']} training and {counts['val']} validation images, rows of {tokenizer.row_length} "
        f"tokens, {len(classes)} classes")
    return meta
