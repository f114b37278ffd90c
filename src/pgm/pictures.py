"""Image tensors as pictures: PIL images, and PNG grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.image_sets import to_uint8
from .errors import ArgumentError
from .formats import make_directory, replaced_atomically


def to_pictures(images: torch.Tensor) -> list:
    """PIL images of float images [N, C, H, W] in [-1, 1]."""
    from PIL import Image

    pixels = to_uint8(images)
    return [Image.fromarray(p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0)) for p in pixels]


def image_format(path: str | Path) -> str:
    """The image format a file name asks for by its suffix (PIL's name for it: PNG, JPEG, ...)."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    formats = Image.registered_extensions()
    if suffix not in formats:
        raise ArgumentError(f"{path}: an image file's name ends in its format, such as .png or .jpg, not "
                            f"{suffix or 'nothing'}")
    return formats[suffix]


def save_grid(images: torch.Tensor, path: str | Path, columns: int, scale: int = 2) -> Path:
    """Images [N, C, H, W] in [-1, 1] -> one image file in the format its suffix names (.png, .jpg,
    ...), `columns` per row, upscaled `scale`x (nearest)."""
    path = Path(path)
    picture = grid_picture(images, columns, scale)
    make_directory(path.parent)
    with replaced_atomically(path) as temporary:
        picture.save(temporary, format=image_format(path))
    return path


def grid_picture(images: torch.Tensor, columns: int, scale: int = 2):
    """Images [N, C, H, W] in [-1, 1] -> one PIL image, `columns` per row, upscaled `scale`x (nearest)."""
    from PIL import Image

    pixels = to_uint8(images)  # [N, C, H, W]
    n, c, h, w = pixels.shape
    rows = -(-n // columns)
    pad = 2
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for index in range(n):
        r, col = divmod(index, columns)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = \
            pixels[index].transpose(1, 2, 0)
    picture = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
