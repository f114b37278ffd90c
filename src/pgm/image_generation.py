"""Images from a trained class-conditional PGM or MaskGIT run: labels in, PNG grids out;
inpainting and outpainting from the run's validation images; FID-style evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.images import to_uint8
from .sampling import SamplingOptions
from .sampling.image import generate_codes, region_mask


def parse_classes(items: list[str] | None, class_names: list[str], num_classes: int) -> list[int]:
    """Class labels from numbers or names (case-insensitive); "none" is the null class."""
    if not items:
        return list(range(len(class_names) or num_classes))
    lowered = [name.lower() for name in class_names]
    labels = []
    for item in items:
        if item.lower() in ("none", "null"):
            labels.append(num_classes)
        elif item.isdigit() and int(item) < num_classes:
            labels.append(int(item))
        elif item.lower() in lowered:
            labels.append(lowered.index(item.lower()))
        else:
            raise ValueError(f"unknown class {item!r}: give a number below {num_classes}, none, or one of "
                             f"{', '.join(class_names)}")
    return labels


def save_grid(images: torch.Tensor, path: Path, columns: int, scale: int = 2) -> Path:
    """Images [N, C, H, W] in [-1, 1] -> one PNG, `columns` per row, upscaled `scale`x (nearest)."""
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
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    picture.save(temporary)
    temporary.replace(path)
    return path


def known_from_validation(data, count: int, region: str, offset: int = 0):
    """(codes [count, N], kept cells [count, N], labels [count]) of the first validation images,
    keeping the cells of `region` (see `region_mask`)."""
    rows = list(range(offset, offset + count))
    if not rows or rows[-1] >= len(data.val):
        raise ValueError(f"the run has {len(data.val)} validation images, fewer than {offset + count}")
    tokens, _ = data.val[rows]
    codes = tokens[:, 1:]
    grid = round(codes.shape[1] ** 0.5)
    keep = region_mask(grid, region).reshape(1, -1).expand(count, -1)
    return codes, keep, data.val.labels_of(rows).tolist()


@torch.no_grad()
def sample_images(model, tokenizer, labels: list[int], *, steps: int, sampler: str, guidance: float,
                  guidance_schedule: str, temperature: float, seed: int, batch_size: int = 64,
                  known_codes=None, known_cells=None, stats: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, grid^2], images [N, C, H, W] in [-1, 1]) for `labels`, in batches."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    labels = torch.as_tensor(labels, dtype=torch.long)
    options = SamplingOptions(temperature=temperature)
    codes = []
    for start in range(0, len(labels), batch_size):
        part = slice(start, start + batch_size)
        known = {} if known_codes is None else dict(known_codes=known_codes[part], known_cells=known_cells[part])
        codes.append(generate_codes(model, labels[part], steps=steps, sampler=sampler, guidance=guidance,
                                    guidance_schedule=guidance_schedule, options=options, generator=generator,
                                    stats=stats, **known).cpu())
    codes = torch.cat(codes)
    return codes, decode_in_batches(tokenizer, codes)


def decode_in_batches(tokenizer, codes: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([tokenizer.decode(codes[i:i + batch_size]).cpu() for i in range(0, len(codes), batch_size)])


@torch.no_grad()
def evaluate_images(model, tokenizer, data, data_config, extractor, *, num_samples: int, steps: int, sampler: str,
                    guidance: float, guidance_schedule: str, seed: int, batch_size: int = 64,
                    temperature: float = 1.0) -> dict:
    """FD and IS under `extractor`'s features (the in-repo classifier, or Inception) of
    `num_samples` generated images, labelled like the first validation images, against every
    real validation image; and the same for the VQ reconstructions of those validation images:
    the floor the tokenizer puts under any model of its codes."""
    import time

    from .data.image_tokens import split_images
    from .data.images import to_unit_range
    from .eval.fid import fd_classifier

    real_images, _, _ = split_images(data_config, train_split=False)
    real = to_unit_range(real_images)
    count = min(num_samples, len(data.val))
    labels = data.val.labels_of(range(count)).tolist()
    started = time.perf_counter()
    _, images = sample_images(model, tokenizer, labels, steps=steps, sampler=sampler, guidance=guidance,
                              guidance_schedule=guidance_schedule, temperature=temperature, seed=seed,
                              batch_size=batch_size)
    seconds = time.perf_counter() - started
    tokens, _ = data.val[list(range(count))]
    generated = fd_classifier(extractor, real, images)
    floor = fd_classifier(extractor, real, decode_in_batches(tokenizer, tokens[:, 1:]))
    return {"fd": generated["fd_classifier"], "is": generated["is_classifier"][0],
            "vq_floor_fd": floor["fd_classifier"], "vq_floor_is": floor["is_classifier"][0],
            "num_samples": count, "real_images": len(real_images), "images_per_s": count / seconds}
