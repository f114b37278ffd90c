"""Turning token lists into fixed-length training rows, stored on disk as memory-mapped arrays.

- "wrap" (the paper's OpenWebText setting): documents are joined with EOS and cut into rows
  `[BOS] <length-2 tokens> [EOS]`; the remainder is dropped.
- "pad" (the paper's LM1B setting): one document per row, `[BOS] doc [EOS] [PAD]...`,
  truncated to the length; the row's valid length is stored beside it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..formats import write_json


def dtype_for(vocab_size: int) -> np.dtype:
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def wrap_rows(documents: Iterable[list[int]], length: int, bos: int, eos: int) -> Iterator[list[int]]:
    body = length - 2
    carry: list[int] = []
    for doc in documents:
        carry.extend(doc)
        carry.append(eos)
        while len(carry) >= body:
            yield [bos, *carry[:body], eos]
            carry = carry[body:]


def pad_rows(documents: Iterable[list[int]], length: int, bos: int, eos: int,
             pad: int) -> Iterator[tuple[list[int], int]]:
    """(row, number of real tokens) per document."""
    for doc in documents:
        row = [bos, *doc[:length - 2], eos]
        yield row + [pad] * (length - len(row)), len(row)


def write_rows(rows: Iterable, path: Path, length: int, vocab_size: int, padded: bool) -> int:
    """Stream rows into `path` (raw array) + `path.json` (shape, dtype); padded rows come as
    (row, valid length) pairs whose lengths go to `path.lengths.npy`. Returns the row count."""
    dtype = dtype_for(vocab_size)
    count, lengths = 0, []
    buffer: list[list[int]] = []
    with open(path, "wb") as handle:
        for item in rows:
            if padded:
                item, valid = item
                lengths.append(valid)
            buffer.append(item)
            count += 1
            if len(buffer) >= 4096:
                handle.write(np.asarray(buffer, dtype=dtype).tobytes())
                buffer.clear()
        if buffer:
            handle.write(np.asarray(buffer, dtype=dtype).tobytes())
    write_json(f"{path}.json", {"rows": count, "length": length, "dtype": dtype.name})
    if padded:
        np.save(f"{path}.lengths.npy", np.asarray(lengths, dtype=np.int32))
    return count


class TokenRows:
    """Rows of a split, memory-mapped: `rows[indices]` -> (tokens [B, L] long, valid [B, L] bool or None);
    `labels` [N] (class labels of image rows) or None."""

    def __init__(self, path: Path):
        meta = json.loads(Path(f"{path}.json").read_text())
        self.length = meta["length"]
        expected = meta["rows"] * meta["length"] * np.dtype(meta["dtype"]).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise ValueError(f"{path} is truncated or corrupt (expected {expected} bytes)")
        self.array = np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["rows"], meta["length"]))
        lengths_path = Path(f"{path}.lengths.npy")
        self.lengths = np.load(lengths_path) if lengths_path.is_file() else None
        labels_path = Path(f"{path}.labels.npy")
        self.labels = np.load(labels_path) if labels_path.is_file() else None

    def labels_of(self, indices) -> torch.Tensor | None:
        return None if self.labels is None else torch.from_numpy(self.labels[np.asarray(indices)].astype(np.int64))

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, indices) -> tuple[torch.Tensor, torch.Tensor | None]:
        indices = np.asarray(indices)
        tokens = torch.from_numpy(self.array[indices].astype(np.int64))
        if self.lengths is None:
            return tokens, None
        lengths = torch.from_numpy(self.lengths[indices].astype(np.int64))
        return tokens, torch.arange(self.length) < lengths[:, None]
