"""The VQ image tokenizer: a trained VQ autoencoder that turns images into rows of codes and codes
back into images.

The layout of its rows (codes, mask id, BOS, grid) is data (`pgm.data.VQCodes`); the network
that makes and decodes them is not, and data imports no network. So the tokenizer lives here,
above `models/` and `data/`: training encodes a dataset with it (`train.py`), and the pipeline
and the image evaluation decode with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .data import VQCodes
from .data.image_sets import to_unit_range
from .errors import CheckpointError, DataError, RunError
from .formats import CONFIG_FILE, TOKENIZER_CONFIG, make_directory, write_json
from .hub import from_pretrained


class VQTokenizer(VQCodes):
    """A VQ autoencoder with the layout of its rows: images -> `[BOS, codes]` rows and codes -> images.
    `source`: the file or checkpoint its weights came from (part of the token cache's key)."""

    def __init__(self, model, source: Path | None = None):
        config = model.config
        super().__init__(config.codebook_size, config.grid_size, config.in_channels, config.image_size)
        self.model = model.eval()
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 [N, C, H, W] -> rows [N, 1 + grid^2] (BOS first)."""
        rows = np.empty((len(images), self.row_length), dtype=np.int64)
        rows[:, 0] = self.bos_id
        for start in range(0, len(images), batch_size):
            batch = to_unit_range(images[start:start + batch_size]).to(self.device)
            rows[start:start + len(batch), 1:] = self.model.encode(batch).cpu().numpy()
        return rows

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Codes [B, grid^2] -> images [B, C, H, W] in [-1, 1] (clamped), on the CPU, in batches."""
        images = [self.model.decode_codes(codes[i:i + batch_size].to(self.device)).clamp(-1, 1).cpu()
                  for i in range(0, len(codes), batch_size)]
        return torch.cat(images) if images else torch.empty(0, self.channels, self.image_size, self.image_size)

    def save(self, directory: Path) -> None:
        """The VQ model as a pretrained directory (without the pixel tokenizer it trained on), with
        the layout of its rows."""
        self.model.save_pretrained(directory, keep_tokenizer=False)
        write_json(directory / TOKENIZER_CONFIG, self.layout())

    def save_reference(self, directory: Path, path: Path) -> None:
        """The layout of its rows and where it is (`path`: what it was loaded from, a file or a
        directory), without its weights: a directory that names its VQ instead of holding it (the
        released VQ-8 is 280 MB)."""
        make_directory(directory)
        write_json(directory / TOKENIZER_CONFIG, {**self.layout(), NAMED: str(Path(path).resolve())})


NAMED = "weights"  # the tokenizer_config.json entry of a VQ tokenizer that names its weights


def load_vq_tokenizer(path: str | Path, *, channels: int | None = None, image_size: int | None = None,
                      device="cpu") -> VQTokenizer:
    """The VQ tokenizer at `path`: a VQ run or pretrained directory, a run's tokenizer/ (holding
    the VQ, or naming its weights), or LlamaGen's released file. `channels` and `image_size`, when
    given, must be what it reads."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    config = path / TOKENIZER_CONFIG
    if path.is_dir() and not (path / CONFIG_FILE).is_file() and config.is_file():
        named = json.loads(config.read_text()).get(NAMED)
        if named is None:
            raise CheckpointError(f"{path} holds neither a VQ model nor the name of one")
        return load_vq_tokenizer(named, channels=channels, image_size=image_size, device=device)
    model = from_pretrained(path)
    source = Path(model.origin.source)
    if model.config.kind != "vq":
        raise DataError(f"{path} holds a {model.config.kind} model, not a VQ autoencoder")
    if channels is not None and (model.config.in_channels, model.config.image_size) != (channels, image_size):
        raise DataError(f"the VQ model in {path} reads {model.config.in_channels}x{model.config.image_size}px "
                        f"images but the data is {channels}x{image_size}px")
    return VQTokenizer(model.to(device), source)


def vq_tokenizer_for_data(data_config, hint: str = "") -> VQTokenizer:
    """The VQ tokenizer that `data.tokenizer=vq:DIR` names, for encoding the data's images; `hint`
    is added when there is none to load (how to train it)."""
    path = Path(data_config.tokenizer[3:])
    try:
        return load_vq_tokenizer(path, channels=data_config.channels, image_size=data_config.image_size)
    except (CheckpointError, RunError) as error:
        raise DataError(f"the VQ tokenizer {path} cannot be loaded ({error}){hint}") from None
