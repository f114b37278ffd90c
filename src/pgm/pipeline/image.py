"""Image models (class-conditional PGM and MaskGIT over VQ codes): classes, guidance, inpainting
and outpainting, image quality and FID; and the VQ tokenizer's own runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.image_sets import fit_size
from ..errors import SamplingError
from ..eval.fid import DEFAULT_CLASSIFIER, FeatureStatistics, frechet_distance, inception_score, load_feature_extractor
from ..eval.image_metrics import (claim_shards, image_quality, reconstruction_quality, reference_labels,
                                  reference_statistics, settings_key, sharded_features, spread_labels)
from ..pictures import to_pictures
from ..sampling import StepUpdate, generate_codes, iterate_codes
from ..sampling.codes import region_mask
from .base import Pipeline, SamplingPlan
from .request import (EVERY_CLASS, VALIDATION_IMAGES, GenerationRequest, Samples, StepEvent, known_pairs, positive,
                      settings_of)


class ImagePipeline(Pipeline):
    """Class-conditional PGM and MaskGIT models of VQ codes: classes, guidance, inpainting."""

    modality = "image"

    @property
    def class_names(self) -> list[str]:
        """The names of the classes, as the training data gave them (none: numbers only)."""
        return self.model.origin.card.get("classes", []) if self.model.origin else []

    def plan(self, request: GenerationRequest) -> SamplingPlan:
        self.checked(request)
        copies = positive("num_samples", request.num_samples, 1)
        if request.images is not None and request.known is None:
            raise SamplingError("images are completed from the region given by known (e.g. known='left')")
        labels, known_codes = self._labels_and_known(request)
        known_cells = originals = None
        if known_codes is not None:
            known_cells = region_cells(len(known_codes), known_codes.shape[1], request.known)
            originals = self.tokenizer.decode(known_codes)
        rows = [index for index in range(len(labels)) for _ in range(copies)]
        labels = [labels[i] for i in rows]
        if known_codes is not None:
            known_codes, known_cells, originals = known_codes[rows], known_cells[rows], originals[rows]
        cells = self.tokenizer.num_tokens
        settings = self.resolved(request.settings,
                                 cells - (int(known_cells.sum(1).min()) if known_cells is not None else 0))
        label_tensor = torch.tensor(labels, dtype=torch.long)

        def updates():
            known = {} if known_codes is None else dict(known_codes=known_codes, known_cells=known_cells)
            return iterate_codes(self.model, label_tensor, settings=settings, generator=self.generator(request.seed),
                                 compile=self.compile, **known)

        def finish(codes, seconds):
            codes = codes.cpu()
            images = self.tokenizer.decode(codes)
            known = known_cells if known_cells is not None else torch.zeros_like(codes, dtype=torch.bool)
            return Samples(to_pictures(images), codes, known, settings.steps, seconds, int((~known).sum()),
                           settings={**settings.summary(), "num_samples": copies, "compile": self.compile},
                           labels=labels, images=images, originals=originals)

        grid = torch.full((len(labels), cells), -1, dtype=torch.long)
        if known_codes is not None:
            grid[known_cells] = known_codes[known_cells]
        side = self.tokenizer.grid_size

        def event(update: StepUpdate, elapsed: float) -> StepEvent:
            committed = update.committed()
            for row, pairs in enumerate(committed):
                for position, code in pairs:
                    grid[row, position] = code
            return StepEvent.of(committed, update.step, settings.steps, elapsed,
                                codes=grid.view(-1, side, side).clone())

        def given() -> StepEvent:
            return StepEvent.of(known_pairs(grid, grid >= 0), -1, settings.steps, 0.0,
                                codes=grid.view(-1, side, side).clone())

        return SamplingPlan(settings.steps, cells, updates, finish, event, given)

    def _labels_and_known(self, request: GenerationRequest) -> tuple[list[int], torch.Tensor | None]:
        """(labels, known codes [N, grid^2] or None) of a request: the images it completes, or the
        classes it asks for (default: every class of a model that has few)."""
        if request.known is not None:
            return self._known_images(request)
        classes, config = request.classes, self.config
        if classes is None:
            if config.num_classes > EVERY_CLASS:
                raise SamplingError(f"{self.name} has {config.num_classes} classes: choose some with classes "
                                    "(--classes 207 360)")
            classes = list(range(config.num_classes))
        return parse_classes(classes, self.class_names, config.num_classes), None

    def _known_images(self, request: GenerationRequest) -> tuple[list[int], torch.Tensor]:
        """(labels, codes [N, grid^2]) of the images to complete: the run's first validation images
        with their own labels, or the given images, labelled by `classes` (default: unconditional)."""
        images = request.images
        if isinstance(images, (list, tuple)) and len(images) == 1 and str(images[0]).strip().isdecimal():
            images = int(str(images[0]).strip())  # the command line's `--images N`
        if images is None or (isinstance(images, int) and not isinstance(images, bool)):
            count = VALIDATION_IMAGES if images is None else images
            if request.classes is not None:
                raise SamplingError("the run's validation images are completed with their own labels; drop classes")
            data = self.data
            count = positive("images", count)
            if count > len(data.val):
                raise SamplingError(f"the run has {len(data.val)} validation images, fewer than {count}")
            tokens, _ = data.val[list(range(count))]
            return data.val.labels_of(range(count)).tolist(), tokens[:, 1:]
        pictures = list(images) if isinstance(images, (list, tuple)) else [images]
        if not pictures:
            raise SamplingError("images is empty: give the images to complete, or a number of validation images")
        codes = torch.as_tensor(self.tokenizer.encode(np.stack([self._pixels(p) for p in pictures]))[:, 1:])
        classes = request.classes if request.classes is not None else ["none"]
        labels = parse_classes(classes, self.class_names, self.config.num_classes)
        if len(labels) not in (1, len(pictures)):
            raise SamplingError(f"give one class for all {len(pictures)} images or one for each, not {len(labels)}")
        return labels * len(pictures) if len(labels) == 1 else labels, codes

    def _pixels(self, picture) -> np.ndarray:
        """uint8 [C, S, S] of a PIL image, a path, an array or a tensor, at the VQ tokenizer's size."""
        from PIL import Image, UnidentifiedImageError

        channels, size = self.tokenizer.channels, self.tokenizer.image_size
        mode = "L" if channels == 1 else "RGB"
        if isinstance(picture, (str, Path)):
            try:
                with Image.open(picture) as opened:
                    picture = opened.convert(mode)
            except (OSError, UnidentifiedImageError) as error:
                raise SamplingError(f"cannot read the image {picture} ({error})") from None
        if isinstance(picture, Image.Image):
            array = np.asarray(picture if picture.mode == mode else picture.convert(mode))
            array = array[None] if channels == 1 else array.transpose(2, 0, 1)
        else:
            array = np.asarray(picture.cpu() if isinstance(picture, torch.Tensor) else picture)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[0] != channels:
                raise SamplingError(f"an image array must be uint8 [{channels}, H, W], got {array.dtype} "
                                    f"{list(array.shape)}")
        return fit_size(array[None], size)[0]

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] in [-1, 1] of VQ codes [N, grid^2]."""
        return self.tokenizer.decode(codes)

    def image_quality(self, *, classifier: str | Path = DEFAULT_CLASSIFIER, inception: str | Path | None = None,
                      num_samples: int = 1000, batch_size: int = 32, seed: int = 0, **settings) -> dict:
        """FD and IS of `num_samples` generated images (labelled like the run's first validation
        images) against the validation images, beside the VQ tokenizer's floor; see
        `pgm.eval.image_metrics.image_quality`. `settings`: how to sample, as in `generate`
        (`SamplerSettings`). With the metric's name and the settings used."""
        positive("num_samples", num_samples)
        positive("batch_size", batch_size)
        resolved = self.resolved(settings_of(settings), self.tokenizer.num_tokens)
        extractor, metric = load_feature_extractor(classifier=classifier, inception=inception, device=self.device)
        with self.autocast():
            scores = image_quality(self.model, self.tokenizer, self.data, self.run_config.data, extractor,
                                   num_samples=num_samples, settings=resolved, seed=seed, batch_size=batch_size,
                                   compile=self.compile)
        return {"metric": metric, "steps": resolved.steps, **resolved.summary(), "temperature": resolved.temperature,
                "compile": self.compile, **scores}

    def fid(self, reference: str | Path, *, inception: str | Path | None = None,
            classifier: str | Path = DEFAULT_CLASSIFIER, num_samples: int = 50_000, batch_size: int = 32,
            shard_size: int = 1000, shards: str | Path | None = None, seed: int = 0, rank: int = 0,
            world_size: int = 1, progress: bool = True, **settings) -> dict | None:
        """FID (with `inception`, else the classifier's FD) and IS of `num_samples` generated images
        against a reference: a folder of images (class sub-folders give the labels to sample, as
        the protocol draws the reference set's labels; a flat folder, or statistics, give every
        class in turn) or an `.npz` of statistics (`mu`, `sigma`). `settings`: how to sample, as in
        `generate` (`SamplerSettings`). Generated in shards kept in `shards` (default:
        fid-shards/KEY beside the model, KEY naming the settings, which settings.json records:
        another evaluation's shards are refused), so that an interruption resumes; with several
        processes (torchrun) each makes its share of the shards and process 0 returns the result
        (computing the reference's statistics, kept for the next evaluation against it), the
        others None."""
        positive("num_samples", num_samples)
        positive("batch_size", batch_size)
        positive("shard_size", shard_size)
        resolved = self.resolved(settings_of(settings), self.tokenizer.num_tokens)
        extractor, metric = load_feature_extractor(classifier=classifier, inception=inception, device=self.device)
        features_of = str(Path(inception if inception is not None else classifier).resolve())
        described = self._fid_settings(resolved, reference, seed=seed, num_samples=num_samples,
                                       batch_size=batch_size, shard_size=shard_size)
        described.update(metric=metric, features=features_of)
        home = (Path(self.name) if Path(self.name).is_dir() else Path(".")) / "fid-shards"
        directory = Path(shards) if shards is not None else home / settings_key(described)
        claim_shards(directory, described)
        given, classes = reference_labels(reference)
        labels = spread_labels(given, num_samples, self.config.num_classes)
        if classes and classes != self.config.num_classes:
            raise SamplingError(f"the reference {reference} has {classes} class folders but the model "
                                f"{self.config.num_classes} classes: its labels would not be the model's")

        def make_images(part: list[int], generator: torch.Generator) -> torch.Tensor:
            with self.autocast():
                codes = generate_codes(self.model, torch.tensor(part), settings=resolved, generator=generator,
                                       compile=self.compile)
                return self.tokenizer.model.decode_codes(codes).float().clamp(-1, 1)

        found = sharded_features(make_images, extractor, labels, directory=directory, shard_size=shard_size, seed=seed,
                                 batch_size=batch_size, rank=rank, world_size=world_size, progress=progress)
        if found is None:
            return None
        features, logits = found
        # One cache per reference, features and size, shared by every evaluation against it.
        statistics_of = {"reference": described["reference"], "features": features_of, "size": self.tokenizer.image_size}
        cache = home / f"reference-{settings_key(statistics_of)}.npz"
        reference_stats = reference_statistics(reference, extractor, size=self.tokenizer.image_size,
                                               channels=self.tokenizer.channels, cache=cache, progress=progress)
        return {**described, "fid": frechet_distance(reference_stats, FeatureStatistics.from_features(features)),
                "is": inception_score(logits, min(10, len(logits))), "reference_count": reference_stats.count,
                "shards": str(directory)}

    def _fid_settings(self, settings, reference, **counts) -> dict:
        """What an FID's shards depend on, by name (their directory's key: keys that were there before
        an option existed stay as they were, so earlier shards still match)."""
        optional = {"compile": self.compile, **settings.cache}
        return {"model": str(Path(self.source).resolve()), "weights": self.model.origin.card.get("weights"),
                "vq": str(self.tokenizer.source), "precision": self.dtype,
                "steps": settings.steps, "sampler": settings.sampler, "guidance": settings.guidance,
                "guidance_schedule": settings.guidance_schedule, "temperature": settings.temperature,
                "seed": counts["seed"], "num_samples": counts["num_samples"], "batch_size": counts["batch_size"],
                "shard_size": counts["shard_size"], "reference": str(Path(reference).resolve()),
                "hide_newest": settings.hide_newest, "redraw": settings.redraw,
                **{name: value for name, value in optional.items() if value is not None}}


class VQPipeline(Pipeline):
    """A VQ tokenizer's run: evaluated (reconstructions), not sampled."""

    modality = "vq"

    def plan(self, request):
        raise SamplingError(f"{self.name} holds a VQ autoencoder: it reconstructs images; sample from a PGM or "
                            "MaskGIT trained on its codes")

    def save_pretrained(self, directory: str | Path) -> Path:
        """The VQ model with the pixel tokenizer it reads, and its model card."""
        return self.model.save_pretrained(directory)

    def reconstruction(self, *, fid: bool = False, classifier: str | Path = DEFAULT_CLASSIFIER,
                       inception: str | Path | None = None) -> dict:
        """Codebook use and code perplexity on the run's validation images and, with `fid` (or
        `inception`), the FD of their reconstructions; see `pgm.eval.image_metrics.reconstruction_quality`."""
        extractor, metric = (None, None)
        if fid or inception is not None:
            extractor, metric = load_feature_extractor(classifier=classifier, inception=inception,
                                                       device=self.device)
        return {"metric": metric, **reconstruction_quality(self.tokenizer, self.run_config.data, extractor)}


def parse_classes(items, class_names: list[str], num_classes: int) -> list[int]:
    """Class labels from numbers or names (case-insensitive; one, or a list); "none" is the null class."""
    items = list(items) if isinstance(items, (list, tuple)) else [items]
    if not items:
        raise SamplingError("classes is empty: give class numbers or names (or leave it out for every class)")
    lowered = [name.lower() for name in class_names]
    labels = []
    for item in items:
        text = str(item).strip().lower()
        if isinstance(item, bool) or not isinstance(item, (int, str, np.integer)):
            raise SamplingError(f"a class is a number or a name, got {item!r}")
        if text in ("none", "null"):
            labels.append(num_classes)
        elif text.isdecimal() and int(text) < num_classes:
            labels.append(int(text))
        elif text in lowered:
            labels.append(lowered.index(text))
        else:
            names = f", or one of {', '.join(class_names)}" if class_names else ""
            raise SamplingError(f"unknown class {item!r}: give a number below {num_classes}, none{names}")
    return labels


def region_cells(count: int, cells: int, region: str) -> torch.Tensor:
    """Bool [count, cells]: the cells kept (known) of each of `count` grids for a named region
    (see `region_mask`)."""
    grid = round(cells ** 0.5)
    return region_mask(grid, region).reshape(1, -1).expand(count, -1)
