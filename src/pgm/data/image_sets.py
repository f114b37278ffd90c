"""Where images come from: Fashion-MNIST (the built-in image set), a folder with one
sub-folder per class, or a Hugging Face dataset.

Every source yields `(images, labels, class_names)`: uint8 arrays [N, C, H, W] at the requested
size and int64 labels [N]. Images smaller than the size are zero-padded around the centre
(Fashion-MNIST's 28x28 becomes 32x32 on its black background); larger ones are resized on the
short side and centre-cropped, as the authors' ImageNet pipeline does.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, MissingDependency

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format, optionally gzipped) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read {path} ({error})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("PGM_FASHION_MNIST", FASHION_MNIST_DIR))


def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) of the "train" (60k) or "test" (10k) split."""
    prefix = {"train": "train", "test": "t10k", "validation": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"Fashion-MNIST has the splits train and test, not {split!r}")
    root = fashion_mnist_dir()

    def find(name: str) -> Path:
        for candidate in (root / f"{name}.gz", root / name):
            if candidate.is_file():
                return candidate
        raise DataError(f"Fashion-MNIST is not installed ({root / name}.gz is missing): "
                        "apt-get install dataset-fashion-mnist, or point PGM_FASHION_MNIST at a folder of its IDX files")

    images = read_idx(find(f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find(f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"the Fashion-MNIST files in {root} disagree: {images.shape[0]} images, {labels.shape} labels")
    return images[:, None].copy(), labels.astype(np.int64)


def fit_size(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, C, h, w] -> [N, C, size, size]: zero-pad smaller images around the centre (as
    Fashion-MNIST's 28 px become 32), resize larger ones and centre-crop (`resize_center_crop`)."""
    n, c, h, w = images.shape
    if h <= size and w <= size:
        out = np.zeros((n, c, size, size), dtype=np.uint8)
        top, left = (size - h) // 2, (size - w) // 2
        out[:, :, top:top + h, left:left + w] = images
        return out
    return np.stack([resize_center_crop(image, size) for image in images])


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [C, h, w] -> [C, size, size] as torchvision's Resize(size) then CenterCrop(size) (the
    authors' ImageNet pipeline): the short side to `size`, the long one to int(size * long / short),
    bilinear with antialiasing (PIL's), up or down; then the centre, offsets rounded."""
    from PIL import Image

    c, h, w = image.shape
    picture = Image.fromarray(image[0] if c == 1 else image.transpose(1, 2, 0))
    if (w <= h and w != size) or (h < w and h != size):
        short, long = (w, h) if w <= h else (h, w)
        resized = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
        picture = picture.resize(resized, Image.Resampling.BILINEAR)
    top, left = int(round((picture.height - size) / 2.0)), int(round((picture.width - size) / 2.0))
    array = np.asarray(picture.crop((left, top, left + size, top + size)))
    return array[None] if c == 1 else array.transpose(2, 0, 1)


def load_image_folder(root: Path, channels: int) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Images of `root/CLASS/*.png|jpg...`, classes in sorted order."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise DataError(f"{root} is not a folder of images")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected {root}/CLASS_NAME/IMAGE.png)")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as picture:
                    array = np.asarray(picture.convert("L" if channels == 1 else "RGB"))
            except (UnidentifiedImageError, OSError) as error:
                raise DataError(f"cannot read the image {path} ({error})") from None
            images.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DataError(f"{root} has class folders but no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images, np.asarray(labels, dtype=np.int64), classes


def load_hf_images(name: str, split: str, image_field: str, label_field: str, channels: int):
    try:
        import datasets
    except ImportError:
        raise MissingDependency(f"hf:{name} needs the datasets package: pip install 'partition-gm[hf]'") from None
    dataset_name, _, config_name = name.partition(":")
    try:
        dataset = datasets.load_dataset(dataset_name, config_name or None, split=split)
    except Exception as error:  # noqa: BLE001 - network, missing dataset, unknown split: one sentence
        raise DataError(f"cannot load the Hugging Face dataset {name!r} split {split!r} ({error})") from None
    for field in (image_field, label_field):
        if field not in dataset.column_names:
            raise DataError(f"hf:{name} has no field {field!r}; fields: {', '.join(dataset.column_names)}")
    images = [np.asarray(item.convert("L" if channels == 1 else "RGB")) for item in dataset[image_field]]
    images = [a[None] if channels == 1 else a.transpose(2, 0, 1) for a in images]
    labels = np.asarray(dataset[label_field], dtype=np.int64)
    feature = dataset.features[label_field]
    classes = list(getattr(feature, "names", None) or [str(i) for i in range(int(labels.max()) + 1)])
    return images, labels, classes


def load_images(source: str, split: str, *, size: int, channels: int, image_field: str = "image",
                label_field: str = "label") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 [N, channels, size, size], int64 labels [N], class names) of one split of `source`."""
    if source == FASHION_MNIST:
        if channels != 1:
            raise DataError(f"Fashion-MNIST is grayscale: set the data's channels to 1, not {channels}")
        images, labels = load_fashion_mnist(split)
        return fit_size(images, size), labels, list(FASHION_MNIST_CLASSES)
    if source.startswith("hf:"):
        images, labels, classes = load_hf_images(source[3:], split, image_field, label_field, channels)
    else:
        images, labels, classes = load_image_folder(Path(source), channels)
    return np.stack([fit_size(image[None], size)[0] for image in images]), labels, classes


def to_unit_range(images) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1]."""
    return torch.as_tensor(images).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float images in [-1, 1] (clamped) -> uint8 [N, C, H, W]."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
