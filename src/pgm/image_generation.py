"""Image generation pieces: class labels from numbers or names, the cells kept for inpainting and
outpainting, and PNG grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.images import to_uint8
from .formats import replaced_atomically
from .sampling.image import region_mask


def parse_classes(items, class_names: list[str], num_classes: int) -> list[int]:
    """Class labels from numbers or names (case-insensitive; one, or a list); "none" is the null class."""
    items = list(items) if isinstance(items, (list, tuple)) else [items]
    if not items:
        raise ValueError("classes is empty: give class numbers or names (or leave it out for every class)")
    lowered = [name.lower() for name in class_names]
    labels = []
    for item in items:
        text = str(item).strip().lower()
        if isinstance(item, bool) or not isinstance(item, (int, str, np.integer)):
            raise ValueError(f"a class is a number or a name, got {item!r}")
        if text in ("none", "null"):
            labels.append(num_classes)
        elif text.isdecimal() and int(text) < num_classes:
            labels.append(int(text))
        elif text in lowered:
            labels.append(lowered.index(text))
        else:
            names = f", or one of {', '.join(class_names)}" if class_names else ""
            raise ValueError(f"unknown class {item!r}: give a number below {num_classes}, none{names}")
    return labels


def save_grid(images: torch.Tensor, path: str | Path, columns: int, scale: int = 2) -> Path:
    """Images [N, C, H, W] in [-1, 1] -> one PNG, `columns` per row, upscaled `scale`x (nearest)."""
    from PIL import Image

    path = Path(path)
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
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as temporary:
        picture.save(temporary, format="PNG")
    return path


def region_cells(count: int, cells: int, region: str) -> torch.Tensor:
    """Bool [count, cells]: the cells kept (known) of each of `count` grids for a named region
    (see `region_mask`)."""
    grid = round(cells ** 0.5)
    return region_mask(grid, region).reshape(1, -1).expand(count, -1)
