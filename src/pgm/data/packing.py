"""Turning token pieces into fixed-length training rows, stored on disk as memory-mapped shards.

- "wrap" (the paper's OpenWebText setting): pieces are joined with EOS into one stream, cut into
  rows `[BOS] <length-2 tokens> [EOS]`; the remainder is dropped at the end.
- "pad" (the paper's LM1B setting): one piece per row, `[BOS] piece [EOS] [PAD]...`, truncated to
  the length; the row's valid length is stored beside it.

A split is a list of shard files, each `NAME.bin` (the raw array) + `NAME.bin.json` (rows,
length, dtype) + for padded rows `NAME.bin.lengths.npy` (+ for pairs `NAME.bin.given.npy`, the
leading tokens each row is given: see `pgm.data.pairs`); `TokenRows` reads them as one array.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..formats import replaced_atomically, write_json


def dtype_for(vocab_size: int) -> np.dtype:
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def with_eos(arrays: list[np.ndarray], eos: int, dtype: np.dtype) -> np.ndarray:
    """The pieces each followed by EOS, as one array: the stream they add to a split."""
    if not arrays:
        return np.zeros(0, dtype=dtype)
    separator = np.array([eos], dtype=dtype)
    return np.concatenate([part for array in arrays for part in (array, separator)], dtype=dtype, casting="unsafe")


class RowPacker:
    """Packs the pieces of one split into rows of `dtype`, across calls (`carry`: the wrapped
    stream's tokens not yet in a row; `position`: the stream's length so far, or the rows made,
    when padded). Pieces come as their stream (`with_eos`) and their lengths without the EOS."""

    def __init__(self, packing: str, length: int, bos: int, eos: int, pad: int, dtype: np.dtype, carry=(),
                 position: int = 0):
        self.padded, self.length, self.bos, self.eos, self.pad = packing == "pad", length, bos, eos, pad
        self.dtype, self.carry, self.position = dtype, np.asarray(carry, dtype=dtype), position

    def starts(self, lengths: np.ndarray) -> np.ndarray:
        """Where the next pieces will start: stream offsets (wrap) or row numbers (pad)."""
        if self.padded:
            return self.position + np.arange(len(lengths))
        return self.position + np.concatenate([[0], np.cumsum(lengths[:-1] + 1)]).astype(np.int64)

    def pack(self, stream: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows [n, L] (and valid lengths [n], padded) completed by the pieces."""
        if self.padded:
            return self._pad(stream, lengths)
        return self.wrap(stream), None

    def wrap(self, stream: np.ndarray) -> np.ndarray:
        """The rows completed by adding `stream` (tokens with their EOS separators) to the carry."""
        body = self.length - 2
        self.position += len(stream)
        joined = np.concatenate([self.carry, stream.astype(self.dtype, copy=False)])
        count = len(joined) // body
        rows = np.empty((count, self.length), dtype=self.dtype)
        rows[:, 0], rows[:, -1] = self.bos, self.eos
        rows[:, 1:-1] = joined[:count * body].reshape(count, body)
        self.carry = joined[count * body:]
        return rows

    def _pad(self, stream: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        count, body = len(lengths), self.length - 2
        kept = np.minimum(lengths, body)
        rows = np.full((count, self.length), self.pad, dtype=self.dtype)
        rows[:, 0] = self.bos
        row = np.repeat(np.arange(count), kept)
        column = np.arange(kept.sum()) - np.repeat(np.cumsum(kept) - kept, kept)
        starts = np.cumsum(lengths + 1) - (lengths + 1)
        rows[row, column + 1] = stream[np.repeat(starts, kept) + column]
        rows[np.arange(count), kept + 1] = self.eos
        self.position += count
        return rows, kept + 2


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.bin"


class ShardWriter:
    """Rows appended to the open shard file of a split; `close` makes it complete: its content on
    disk, then its description (the .json beside it, written last: a shard without one is
    unfinished)."""

    def __init__(self, directory: Path, split: str, number: int, length: int, dtype: np.dtype, padded: bool):
        self.directory, self.split, self.number = directory, split, number
        self.length, self.dtype, self.padded = length, dtype, padded
        self.rows, self.handle, self.lengths, self.given = 0, None, [], []

    @property
    def path(self) -> Path:
        return self.directory / shard_name(self.split, self.number)

    @property
    def bytes(self) -> int:
        return self.rows * self.length * self.dtype.itemsize

    def write(self, rows: np.ndarray, lengths: np.ndarray | None = None, given: np.ndarray | None = None) -> None:
        if not len(rows):
            return
        if self.handle is None:
            self.handle = open(self.path, "wb")
        self.handle.write(np.ascontiguousarray(rows, dtype=self.dtype).data)
        if self.padded:
            self.lengths.append(np.asarray(lengths, dtype=np.int32))
        if given is not None:
            self.given.append(np.asarray(given, dtype=np.int32))
        self.rows += len(rows)

    def close(self) -> dict | None:
        """Finish the open shard; returns its entry ({"name", "rows"}) or None when it is empty."""
        if self.handle is None:
            return None
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        if self.padded:
            with replaced_atomically(f"{self.path}.lengths.npy") as temporary:
                np.save(temporary, np.concatenate(self.lengths))
        if self.given:
            with replaced_atomically(f"{self.path}.given.npy") as temporary:
                np.save(temporary, np.concatenate(self.given))
        write_json(f"{self.path}.json", {"rows": self.rows, "length": self.length, "dtype": self.dtype.name})
        entry = {"name": self.path.name, "rows": self.rows}
        self.number += 1
        self.rows, self.handle, self.lengths, self.given = 0, None, [], []
        return entry

    def abandon(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def truncate_shard(path: Path, rows: int) -> None:
    """Keep the first `rows` rows of a complete shard. Its description goes last, so a kill on the
    way leaves it saying more rows than there are, and the same call finishes the job."""
    meta = json.loads(Path(f"{path}.json").read_text())
    if rows >= meta["rows"]:
        return
    lengths_path = Path(f"{path}.lengths.npy")
    if lengths_path.is_file():
        kept = np.load(lengths_path)[:rows]
        with replaced_atomically(lengths_path) as temporary:
            np.save(temporary, kept)
    os.truncate(path, rows * meta["length"] * np.dtype(meta["dtype"]).itemsize)
    write_json(f"{path}.json", {**meta, "rows": rows})


def remove_shard(path: Path) -> None:
    for file in (Path(f"{path}.json"), path, Path(f"{path}.lengths.npy"), Path(f"{path}.labels.npy"),
                 Path(f"{path}.given.npy")):
        file.unlink(missing_ok=True)


class _Shard:
    def __init__(self, path: Path):
        try:
            meta = json.loads(Path(f"{path}.json").read_text())
        except (OSError, ValueError):
            raise DataError(f"{path} has no readable description ({path.name}.json)") from None
        self.length, self.rows = meta["length"], meta["rows"]
        expected = self.rows * self.length * np.dtype(meta["dtype"]).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise DataError(f"{path} is truncated or corrupt (expected {expected} bytes)")
        self.array = np.memmap(path, dtype=meta["dtype"], mode="r", shape=(self.rows, self.length))
        lengths_path, labels_path = Path(f"{path}.lengths.npy"), Path(f"{path}.labels.npy")
        self.lengths = np.load(lengths_path, mmap_mode="r") if lengths_path.is_file() else None
        self.labels = np.load(labels_path) if labels_path.is_file() else None
        given_path = Path(f"{path}.given.npy")
        self.given = np.load(given_path) if given_path.is_file() else None


class TokenRows:
    """The rows of a split, memory-mapped from its shards as one array:
    `rows[indices]` -> (tokens [B, L] long, valid [B, L] bool or None); `labels` [N] (class labels
    of image rows) or None."""

    def __init__(self, shards: Path | list[Path]):
        self.shards = [_Shard(Path(path)) for path in ([shards] if isinstance(shards, (str, Path)) else shards)]
        if not self.shards:
            raise DataError("a split needs at least one shard")
        self.length = self.shards[0].length
        self.starts = np.cumsum([0] + [shard.rows for shard in self.shards])
        padded = [shard.lengths is not None for shard in self.shards]
        self.padded = padded[0]
        if any(p != self.padded for p in padded) or any(s.length != self.length for s in self.shards):
            raise DataError("the shards of a split disagree in row length or padding")
        labels = [shard.labels for shard in self.shards]
        self.labels = np.concatenate(labels) if all(label is not None for label in labels) else None
        given = [shard.given for shard in self.shards]
        self.given = np.concatenate(given) if all(g is not None for g in given) else None

    @property
    def lengths(self) -> np.ndarray | None:
        """The valid length of every row (padded rows), or None."""
        return np.concatenate([shard.lengths for shard in self.shards]) if self.padded else None

    def chunks(self, rows: int = 8192, start: int = 0):
        """(tokens [n, L], valid lengths [n] or None) in order from row `start`, `rows` at a time: a
        pass over the split in bounded memory (read, not mapped: mapped pages would stay in this
        process's RSS)."""
        for shard, first in zip(self.shards, self.starts):
            if first + shard.rows <= start:
                continue
            with open(shard.array.filename, "rb") as handle:
                skip = max(0, start - int(first))
                handle.seek(skip * self.length * shard.array.dtype.itemsize)
                for start_row in range(skip, shard.rows, rows):
                    count = min(rows, shard.rows - start_row)
                    tokens = np.fromfile(handle, dtype=shard.array.dtype, count=count * self.length)
                    lengths = None if shard.lengths is None else np.asarray(shard.lengths[start_row:start_row + count])
                    yield tokens.reshape(count, self.length), lengths

    def given_of(self, indices) -> torch.Tensor | None:
        """[B] how many leading tokens of each row are given (BOS and prompt of a pair), or None."""
        return None if self.given is None else torch.from_numpy(self.given[np.asarray(indices)].astype(np.int64))

    def labels_of(self, indices) -> torch.Tensor | None:
        return None if self.labels is None else torch.from_numpy(self.labels[np.asarray(indices)].astype(np.int64))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _gather(self, indices: np.ndarray, field: str) -> np.ndarray:
        if len(self.shards) == 1:
            return np.asarray(getattr(self.shards[0], field)[indices])
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        which = np.searchsorted(self.starts, indices, side="right") - 1
        first = getattr(self.shards[0], field)
        out = np.empty((len(indices), *first.shape[1:]), dtype=first.dtype)
        for number in np.unique(which):
            chosen = which == number
            out[chosen] = getattr(self.shards[number], field)[indices[chosen] - self.starts[number]]
        return out

    def __getitem__(self, indices) -> tuple[torch.Tensor, torch.Tensor | None]:
        indices = np.asarray(indices)
        tokens = torch.from_numpy(self._gather(indices, "array").astype(np.int64))
        if not self.padded:
            return tokens, None
        lengths = torch.from_numpy(self._gather(indices, "lengths").astype(np.int64))
        return tokens, torch.arange(self.length) < lengths[:, None]
