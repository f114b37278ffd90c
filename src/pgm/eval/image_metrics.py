"""Image evaluation: the codebook statistics and reconstruction quality of a VQ tokenizer, and the
quality of generated images (FD and IS under a feature extractor) beside the floor that the VQ
tokenizer puts under any model of its codes."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..data.image_rows import split_images
from ..data.image_sets import IMAGE_SUFFIXES, resize_center_crop, to_unit_range
from ..errors import DataError
from ..formats import make_directory, write_json
from ..models.base import check_ids
from ..sampling import generate_codes
from ..sampling.settings import SamplerSettings
from .fid import FeatureStatistics, fd_classifier


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error on the [-1, 1] scale (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")


def code_statistics(codes: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(fraction of the codebook used, perplexity exp(entropy) of the code histogram) of `codes` (any shape)."""
    flat = codes.reshape(-1)
    if flat.numel() == 0:
        raise DataError("code_statistics needs at least one code")
    check_ids("codes", flat[None], codebook_size, what="code id")
    counts = torch.bincount(flat.long(), minlength=codebook_size).double()
    probabilities = counts[counts > 0] / flat.numel()
    entropy = -(probabilities * probabilities.log()).sum()
    return probabilities.numel() / codebook_size, float(entropy.exp())


@torch.no_grad()
def reconstruction_quality(vq, data_config, extractor=None) -> dict:
    """How a VQ tokenizer (`pgm.vq_tokenizer.VQTokenizer`) codes the validation images of
    `data_config`: the share of its codebook they use, the perplexity of their codes and, with a
    feature `extractor`, the FD between the images and their reconstructions."""
    images, _, _ = split_images(data_config, train_split=False)
    codes = torch.as_tensor(vq.encode(images)[:, 1:])
    usage, perplexity = code_statistics(codes, vq.codebook_size)
    result = {"images": len(images), "codebook_size": vq.codebook_size, "usage": usage,
              "code_perplexity": perplexity}
    if extractor is not None:
        result["fd"] = fd_classifier(extractor, to_unit_range(images), vq.decode(codes))["fd_classifier"]
    return result


@torch.no_grad()
def image_quality(model, vq, data, data_config, extractor, *, num_samples: int,
                  settings: SamplerSettings = SamplerSettings(), seed: int = 0, batch_size: int = 64,
                  compile: str | None = None) -> dict:
    """FD and IS under `extractor`'s features (the in-repo classifier, or Inception) of
    `num_samples` generated images (sampled as `settings` say), labelled like the first validation
    images, against every real validation image; and the same for the VQ reconstructions of those
    validation images: the floor the tokenizer puts under any model of its codes. `compile`: a
    torch.compile mode (see `pgm.sampling.iterate_pgm`)."""
    real_images, _, _ = split_images(data_config, train_split=False)
    real = to_unit_range(real_images)
    count = min(num_samples, len(data.val))
    labels = data.val.labels_of(range(count)).tolist()
    settings = settings.resolve(model.config.kind, "image", unknown=vq.num_tokens, compile=compile)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    started = time.perf_counter()
    codes = torch.cat([generate_codes(model, torch.tensor(labels[start:start + batch_size]), settings=settings,
                                      generator=generator, compile=compile).cpu()
                       for start in range(0, count, batch_size)])
    images = vq.decode(codes)
    seconds = time.perf_counter() - started
    tokens, _ = data.val[list(range(count))]
    generated = fd_classifier(extractor, real, images)
    floor = fd_classifier(extractor, real, vq.decode(tokens[:, 1:]))
    return {"fd": generated["fd_classifier"], "is": generated["is_classifier"][0],
            "vq_floor_fd": floor["fd_classifier"], "vq_floor_is": floor["is_classifier"][0],
            "num_samples": count, "real_images": len(real_images), "images_per_s": count / seconds}


# --- FID against a reference set, in shards -------------------------------------------------------------------------

SHARD_PATTERN = "shard-{:05d}.npz"
SETTINGS_FILE = "settings.json"  # what a shard directory's images were made with


def settings_key(settings: dict) -> str:
    """A short name for a set of settings (a shard directory's, a reference's statistics')."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def claim_shards(directory: Path, settings: dict) -> None:
    """Record the settings a shard directory is for, and refuse one that holds another evaluation's."""
    recorded = directory / SETTINGS_FILE
    if recorded.is_file():
        found = json.loads(recorded.read_text())
        if found != settings:
            changed = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
            raise DataError(f"{directory} holds the shards of another evaluation (it differs in "
                            f"{', '.join(changed)}): choose other shards, or remove them")
        return
    make_directory(directory)
    write_json(recorded, settings)


def reference_files(folder: Path) -> tuple[list[Path], list[int] | None, int]:
    """The images of a reference folder in sorted order, their labels (the index of their class
    sub-folder, sorted by name: ImageNet's synset folders give its class order; None when the
    folder is flat), and the number of class sub-folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"the reference {folder} is neither a folder of images nor an .npz of statistics")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        pairs = [(path, label) for label, directory in enumerate(classes) for path in sorted(directory.iterdir())
                 if path.suffix.lower() in IMAGE_SUFFIXES]
    else:
        pairs = [(path, None) for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not pairs:
        raise DataError(f"the reference folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [path for path, _ in pairs], (None if not classes else [label for _, label in pairs]), len(classes)


def read_pictures(paths: list[Path], size: int, channels: int) -> torch.Tensor:
    """Images from files, resized on the short side and centre-cropped to `size`, in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as picture:
                array = np.asarray(picture.convert("L" if channels == 1 else "RGB"))
        except (OSError, UnidentifiedImageError) as error:
            raise DataError(f"cannot read the reference image {path} ({error})") from None
        arrays.append(resize_center_crop(array[None] if channels == 1 else array.transpose(2, 0, 1), size))
    return to_unit_range(np.stack(arrays))


def extract(extractor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of images in [-1, 1], on the CPU."""
    device = next(extractor.parameters()).device
    features, logits = extractor.features(images.to(device))
    return features.float().cpu(), logits.float().cpu()


def reference_labels(reference: str | Path) -> tuple[list[int] | None, int]:
    """(the labels a reference gives to sample, its number of classes): its class folders', or
    (None, 0) for statistics and flat folders."""
    reference = Path(reference)
    return (None, 0) if reference.suffix == ".npz" else reference_files(reference)[1:]


@torch.no_grad()
def reference_statistics(reference: str | Path, extractor, *, size: int, channels: int, batch_size: int = 64,
                         cache: Path | None = None, progress: bool = True) -> FeatureStatistics:
    """The feature statistics of a reference: precomputed ones in an `.npz` (`mu`, `sigma`), or
    those of a folder of images, computed here (and kept in `cache`, which the next evaluation
    reads instead)."""
    from tqdm import tqdm

    reference = Path(reference)
    if reference.suffix == ".npz":
        return FeatureStatistics.load_npz(reference)
    if cache is not None and cache.is_file():
        return FeatureStatistics.load_npz(cache)
    paths = reference_files(reference)[0]
    features = []
    for start in tqdm(range(0, len(paths), batch_size), desc="reference features", unit="batch",
                      disable=not progress):
        features.append(extract(extractor, read_pictures(paths[start:start + batch_size], size, channels))[0])
    statistics = FeatureStatistics.from_features(torch.cat(features))
    if cache is not None:
        make_directory(cache.parent)
        statistics.save_npz(cache)
    return statistics


def spread_labels(labels: list[int] | None, count: int, classes: int) -> list[int]:
    """`count` labels to sample: the reference's, taken evenly over it (a reference sorted by
    class keeps every class in its share), or every class in turn when it gives none."""
    if not labels:
        return [i % classes for i in range(count)]
    return [labels[i * len(labels) // count] for i in range(count)]


@torch.no_grad()
def sharded_features(make_images, extractor, labels: list[int], *, directory: Path, shard_size: int, seed: int,
                     batch_size: int = 32, rank: int = 0, world_size: int = 1, progress: bool = True,
                     wait_seconds: float = 5.0, stall_seconds: float = 3600.0):
    """(features [N, D], logits [N, K]) of N = len(labels) generated images, made `shard_size` at a
    time by `make_images(labels, generator)` (images in [-1, 1]). Each shard's features (and the
    labels they were made for) are written atomically to `directory` as it is finished, and
    shards already there are not made again, so an interrupted evaluation resumes where it
    stopped; shard i is made by process i % world_size with a generator seeded by (seed, i), so
    the result does not depend on how many processes share the work or how often it was
    interrupted. Process 0 waits for the others' shards (refusing after `stall_seconds` without a
    new one) and returns the features; the others return None."""
    import time

    from tqdm import tqdm

    from ..formats import replaced_atomically
    from .perplexity import seed_for

    make_directory(directory)
    shards = -(-len(labels) // shard_size)
    paths = [directory / SHARD_PATTERN.format(i) for i in range(shards)]

    def part(shard: int) -> list[int]:
        return labels[shard * shard_size:(shard + 1) * shard_size]

    mine = [i for i in range(rank, shards, world_size) if not paths[i].is_file()]
    bar = tqdm(total=sum(len(part(i)) for i in mine), unit="img",
               desc=f"sampling (rank {rank})" if world_size > 1 else "sampling", disable=not progress)
    for shard in mine:
        generator = torch.Generator(device=next(extractor.parameters()).device).manual_seed(seed_for(seed, shard))
        features, logits = [], []
        for start in range(0, len(part(shard)), batch_size):
            batch_features, batch_logits = extract(extractor, make_images(part(shard)[start:start + batch_size],
                                                                          generator))
            features.append(batch_features)
            logits.append(batch_logits)
            bar.update(len(batch_features))
        with replaced_atomically(paths[shard]) as temporary:
            np.savez(temporary, features=torch.cat(features).numpy(), logits=torch.cat(logits).numpy(),
                     labels=np.asarray(part(shard)))
    bar.close()
    if rank != 0:
        return None
    done, since = sum(path.is_file() for path in paths), time.monotonic()
    while done < shards:  # the other processes' shards
        time.sleep(wait_seconds)
        now = sum(path.is_file() for path in paths)
        done, since = (now, time.monotonic()) if now > done else (done, since)
        if time.monotonic() - since > stall_seconds:
            raise DataError(f"{shards - done} shards of {directory} have not appeared for {stall_seconds:.0f} s: has "
                            "another process stopped? Run the evaluation again to make the missing ones")
    features, logits = [], []
    for shard, path in enumerate(paths):
        with np.load(path) as stored:
            if stored["labels"].tolist() != part(shard):
                raise DataError(f"{path} was made for other labels: {directory} holds another evaluation's shards")
            features.append(stored["features"])
            logits.append(stored["logits"])
    return torch.from_numpy(np.concatenate(features)), torch.from_numpy(np.concatenate(logits))
