"""The `data` section of a run's configuration, and the recipe that decides its rows."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..config import Config, require
from .corpus import BUILTIN

# Fields that say where or how the data is read, not what the rows hold: two recipes that differ
# only in these give the same rows.
NOT_IN_RECIPE = ("prepared", "gpt2_file", "streaming")
# What a tokenizer given from elsewhere (a distillation's teacher, a run's init_from) decides instead.
TOKENIZER_FIELDS = ("tokenizer", "vocab_size", "gpt2_file")


@dataclasses.dataclass
class DataConfig(Config):
    """Where the text comes from and how it becomes rows of tokens."""

    source: str = BUILTIN  # "builtin", a .txt/.jsonl(.gz/.zst)/.parquet file or folder, or "hf:NAME[:CONFIG]"
    text_field: str = "text"  # the field holding the text in .jsonl/.parquet files and Hugging Face datasets
    split: str = "train"  # Hugging Face split to train on
    revision: str = ""  # Hugging Face: the dataset repository's branch, tag or commit (empty: its main branch)
    streaming: bool = False  # Hugging Face: stream the dataset instead of caching it as Arrow files first
    val_source: str = ""  # a separate validation source; empty: hold documents out of `source`
    val_split: str = "validation"  # Hugging Face split of val_source
    val_every: int = 20  # hold out every k-th document ...
    val_last: int = 0  # ... or, when > 0, the last N documents
    chunk_chars: int = 4000  # cut longer documents at paragraph breaks (0: never)
    limit_documents: int = 0  # keep only the first N documents (0: all)
    tokenizer: str = "bpe"  # "bpe" (trained on the training split), "gpt2", or "hf:NAME"
    vocab_size: int = 4096  # of the trained BPE
    bpe_sample_chars: int = 100_000_000  # the BPE is trained on the first this many characters of training text
    gpt2_file: str = ""  # a local gpt2.tiktoken for offline use
    packing: Literal["wrap", "pad"] = "wrap"
    prepared: str = ""  # a data directory made by `pgm prepare`, used in place (its recipe must be this one)
    # pairs: (prompt, response) records, one per row `[BOS] prompt response [EOS] [EOS]...`, the prompt
    # given (never masked, hidden or scored); a .jsonl file or folder, or "builtin" (a copy task)
    format: Literal["text", "pairs"] = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    too_long: Literal["cut", "refuse"] = "cut"  # pairs: cut the response's end, or refuse a pair that does not fit
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
        require(self.bpe_sample_chars >= 1, f"bpe_sample_chars must be positive, got {self.bpe_sample_chars}")
        require(self.channels in (1, 3), f"channels must be 1 or 3, got {self.channels}")
        require(self.image_size >= 4 and self.limit_images >= 0, "image_size must be >= 4 and limit_images >= 0")
        require(not (self.prepared and self.is_image), "data.prepared holds text rows; image data is prepared "
                                                       "by the run that trains on it")
        if self.format == "pairs":
            require(not self.is_image, "data.format=pairs holds text pairs; an image run reads images")
            require(self.packing == "pad", "data.format=pairs puts one pair in each row, padded: set data.packing=pad")
            require(not self.val_source and not self.val_last,
                    "data.format=pairs holds out every val_every-th pair; val_source and val_last apply to text")

    def recipe(self, length: int) -> dict:
        """What decides the rows of data prepared with these settings at this row length."""
        return {"data": {k: v for k, v in self.to_dict().items() if k not in NOT_IN_RECIPE}, "length": length}


def normalised_recipe(recipe) -> dict | None:
    """A recipe as this version writes it (fields added since filled with their defaults), or None
    when it is not one."""
    try:
        return DataConfig.from_dict(recipe["data"]).recipe(recipe["length"])
    except (TypeError, KeyError, ValueError):
        return None


def recipe_differences(wanted: dict, found: dict) -> list[str]:
    """`length: WANTED wanted, FOUND prepared` (and `data.FIELD: ...`) for each setting in which two
    recipes differ."""
    wanted, found = normalised_recipe(wanted), normalised_recipe(found) or {"data": {}, "length": None}
    pairs = [("length", wanted["length"], found["length"])]
    pairs += [(f"data.{key}", value, found["data"].get(key)) for key, value in wanted["data"].items()]
    return [f"{name}: {a!r} wanted, {b!r} prepared" for name, a, b in pairs if a != b]
