"""Image-sample quality: the Fréchet distance between feature sets, the Inception Score, and the
feature extractors they run on.

Two extractors:
- `FeatureClassifier`, a small CNN trained here on Fashion-MNIST (`train_classifier`). It needs
  no download, so it is the metric we can compute offline. Its numbers are reported as
  "FD (classifier features)" (`fd_classifier`) and "IS (classifier)" (`is_classifier`): they
  are not comparable with Inception FID/IS or with any published number.
- `InceptionFeatures`, the standard protocol (reference/image-stack.md §5): torch-fidelity's
  Inception-v3 on images resized with clean-fid's float bicubic resizer (`clean_resize`).
  It needs the optional torch-fidelity package and its weights file.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.image_sets import to_unit_range
from ..errors import ArgumentError, DataError, MissingDependency
from ..models.classifier import ClassifierConfig, FeatureClassifier

INCEPTION_SIZE = 299
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")


# --- Fréchet distance and Inception Score ---------------------------------------------------------------------------

@dataclasses.dataclass
class FeatureStatistics:
    """The mean [D] and covariance [D, D] (float64) of `count` feature vectors."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int

    @classmethod
    def from_features(cls, features) -> FeatureStatistics:
        """Statistics of a [N, D] tensor or array (N >= 2; unbiased covariance, as numpy.cov)."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2:
            raise ArgumentError(f"features must have shape [count, dim], got {features.shape}")
        if features.shape[0] < 2:
            raise ArgumentError(f"a covariance needs at least 2 feature vectors, got {features.shape[0]}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1),
                   features.shape[0])

    def save_npz(self, path: str | Path) -> None:
        """The common statistics layout (`mu`, `sigma`, as pytorch-fid and clean-fid write it), plus
        the count, written atomically."""
        from ..formats import replaced_atomically

        with replaced_atomically(Path(path)) as temporary:
            np.savez(temporary, mu=self.mean, sigma=self.covariance, count=self.count)

    @classmethod
    def load_npz(cls, path: str | Path) -> FeatureStatistics:
        """Statistics from an `.npz` holding `mu` [D] and `sigma` [D, D] (and optionally `count`)."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                if "mu" not in stored or "sigma" not in stored:
                    raise DataError(f"{path} holds {', '.join(stored.files)}, not the statistics mu and sigma")
                mean, covariance = stored["mu"].astype(np.float64), stored["sigma"].astype(np.float64)
                count = int(stored["count"]) if "count" in stored else 0
        except DataError:
            raise
        except (OSError, ValueError, EOFError) as error:
            raise DataError(f"{path} is not readable statistics ({error})") from None
        if mean.ndim != 1 or covariance.shape != (mean.shape[0], mean.shape[0]):
            raise DataError(f"{path} holds mu {mean.shape} and sigma {covariance.shape}, not [D] and [D, D]")
        return cls(mean, covariance, count)


def _sqrtm_product(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """sqrtm(a @ b), or None where the product is singular or the root is not finite."""
    from scipy.linalg import LinAlgWarning, sqrtm

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LinAlgWarning)
        root = sqrtm(a @ b)
    singular = any(issubclass(w.category, LinAlgWarning) for w in caught)
    return None if singular or not np.isfinite(root).all() else root


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr sqrtm(S_a S_b), in float64.

    A singular product (fewer samples than dimensions, dead ReLU features) gets eps*I added to
    both covariances, as pytorch-fid and clean-fid do; unlike them, the traces then use the
    regularised covariances too, so a set against itself still scores 0 rather than -2*D*eps
    (a difference of 2*D*eps, 0.004 for Inception's 2048 dimensions). Rounding leaves a tiny
    imaginary part on the root, which is dropped; a large one means the statistics are broken
    and raises ValueError.
    """
    mean_a, mean_b = np.asarray(a.mean, np.float64), np.asarray(b.mean, np.float64)
    cov_a, cov_b = np.asarray(a.covariance, np.float64), np.asarray(b.covariance, np.float64)
    if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != mean_a.shape * 2:
        raise ArgumentError(f"the statistics disagree: means {mean_a.shape} and {mean_b.shape}, "
                            f"covariances {cov_a.shape} and {cov_b.shape}")
    root = _sqrtm_product(cov_a, cov_b)
    if root is None:
        offset = eps * np.eye(cov_a.shape[0])
        cov_a, cov_b = cov_a + offset, cov_b + offset
        root = _sqrtm_product(cov_a, cov_b)
        if root is None:
            raise ArgumentError("the covariance product stays singular even with eps*I added: "
                                "are the features non-finite?")
    if np.iscomplexobj(root):
        largest = np.abs(np.diagonal(root).imag).max()
        if largest > 1e-3:
            raise ArgumentError(f"sqrtm(S_a S_b) has an imaginary component of {largest:.3g}: the covariances are "
                                "not valid (non-symmetric or not positive semi-definite)")
        root = root.real
    difference = mean_a - mean_b
    return float(difference @ difference + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root))


def inception_score(logits, splits: int = 10, *, shuffle_seed: int | None = 2020) -> tuple[float, float]:
    """(mean, std) over `splits` chunks of exp(E_x KL(p(y|x) || p(y))), p(y) the chunk's mean, in float64.

    The rows are first shuffled with numpy's RandomState(shuffle_seed), as torch-fidelity does
    (same seed, same permutation), so samples generated class by class still spread over every
    chunk; shuffle_seed=None keeps the given order.
    """
    logits = torch.as_tensor(logits).detach().cpu().double()
    if logits.dim() != 2:
        raise ArgumentError(f"logits must have shape [count, classes], got {tuple(logits.shape)}")
    count = logits.shape[0]
    if not 1 <= splits <= count:
        raise ArgumentError(f"splits must be in [1, {count}] for {count} samples, got {splits}")
    if shuffle_seed is not None:
        logits = logits[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(count))]
    log_p = logits.log_softmax(dim=1)
    scores = []
    for index in range(splits):
        chunk = log_p[index * count // splits:(index + 1) * count // splits]
        log_marginal = chunk.exp().mean(dim=0).log()
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1)
        scores.append(math.exp(kl.mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


# --- The Fashion-MNIST feature classifier (pgm.models.classifier) ------------------------------------------------

def _unit_float(images) -> torch.Tensor:
    """uint8 images -> float in [-1, 1]; float images are taken to be in [-1, 1] already."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return to_unit_range(images)
    if not images.dtype.is_floating_point:
        raise ArgumentError(f"images must be uint8 or float in [-1, 1], got {images.dtype}")
    return images.float()


@torch.no_grad()
def _classify(classifier: FeatureClassifier, images, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of all images on the CPU, computed in eval mode, batch by batch."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    features, logits = [], []
    try:
        for start in range(0, len(images), batch_size):
            batch = _unit_float(images[start:start + batch_size]).to(device)
            batch_features, batch_logits = classifier.features(batch)
            features.append(batch_features.cpu())
            logits.append(batch_logits.cpu())
    finally:
        classifier.train(was_training)
    if not features:
        raise ArgumentError("no images to classify")
    return torch.cat(features), torch.cat(logits)


def train_classifier(train_images, train_labels, test_images, test_labels, *, epochs: int = 2,
                     batch_size: int = 128, lr: float = 3e-3, seed: int = 0, log: Callable[[str], None] = print,
                     config: ClassifierConfig | None = None) -> tuple[FeatureClassifier, float]:
    """Train a `FeatureClassifier` on uint8 images [N, C, S, S] with int labels; (model in eval mode, test accuracy).

    AdamW with a one-cycle learning-rate schedule (warm-up, then cosine decay to ~0): it
    converges in the few epochs a CPU can afford. The config defaults to the data's channels
    and size with 10 classes or more if the labels need them.
    """
    if epochs < 1 or batch_size < 1:
        raise ArgumentError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    train_images, test_images = torch.as_tensor(train_images), torch.as_tensor(test_images)
    train_labels, test_labels = torch.as_tensor(train_labels).long(), torch.as_tensor(test_labels).long()
    for name, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ArgumentError(f"{name}_images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ArgumentError(f"{name}_labels has shape {tuple(labels.shape)} for {images.shape[0]} images")
    if config is None:
        config = ClassifierConfig(in_channels=train_images.shape[1], image_size=train_images.shape[2],
                                  num_classes=max(10, int(train_labels.max()) + 1))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = FeatureClassifier(config)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train_images) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    start_time = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            index = order[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(model(to_unit_range(train_images[index])), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
        logits = _classify(model, test_images, 512)[1]
        accuracy = (logits.argmax(dim=1) == test_labels).double().mean().item()
        log(f"classifier epoch {epoch + 1}/{epochs}: train loss {total_loss / steps_per_epoch:.4f}, "
            f"test accuracy {accuracy:.2%} ({time.perf_counter() - start_time:.1f}s)")
    return model.eval(), accuracy


def classifier_statistics(classifier: FeatureClassifier, images,
                          batch_size: int = 256) -> tuple[FeatureStatistics, torch.Tensor]:
    """(feature statistics, logits [N, num_classes]) of uint8 images or float images in [-1, 1]."""
    features, logits = _classify(classifier, images, batch_size)
    return FeatureStatistics.from_features(features), logits


def fd_classifier(classifier: FeatureClassifier, real, fake, *, splits: int = 10, batch_size: int = 256) -> dict:
    """{"fd_classifier": FD between the real and generated images' classifier features,
    "is_classifier": (mean, std) IS of the generated images' classifier logits, "count": generated images}."""
    real_statistics, _ = classifier_statistics(classifier, real, batch_size)
    fake_statistics, fake_logits = classifier_statistics(classifier, fake, batch_size)
    return {"fd_classifier": frechet_distance(real_statistics, fake_statistics),
            "is_classifier": inception_score(fake_logits, min(splits, fake_statistics.count)),
            "count": fake_statistics.count}


# --- The standard Inception-v3 path ---------------------------------------------------------------------------------

def clean_resize(images, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """uint8 or float images in [0, 255] [B, C, H, W] -> uint8 [B, C, size, size], as the reference does it.

    Each channel is resized as a PIL float ("F") image with bicubic filtering (clean-fid), then
    truncated to uint8 without clipping: the values bicubic overshoots past [0, 255] wrap
    around modulo 256 (-1.5 -> 255, 256.7 -> 0), exactly as the reference's unchecked
    float->uint8 cast does on x86; the wrap is written out so every platform agrees.
    """
    from PIL import Image

    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ArgumentError(f"images must have shape [batch, channels, height, width], got {images.shape}")
    resized = np.empty((*images.shape[:2], size, size), dtype=np.float32)
    for index in np.ndindex(*images.shape[:2]):
        channel = Image.fromarray(np.ascontiguousarray(images[index]))
        resized[index] = np.asarray(channel.resize((size, size), Image.Resampling.BICUBIC))
    return torch.from_numpy((np.trunc(resized).astype(np.int64) % 256).astype(np.uint8))


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception-v3 ("inception-v3-compat"): images in [-1, 1] -> (pool features, logits).

    `weights_path` is a local copy of torch-fidelity's weights file; without one, torch-fidelity
    downloads it (which fails offline).
    """

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise MissingDependency("the Inception-v3 metrics need torch-fidelity: pip install torch-fidelity, and "
                                    "offline "
                                    f"also pass weights_path, a local copy of {INCEPTION_WEIGHTS_URL}") from None
        if weights_path is not None and not Path(weights_path).is_file():
            raise ArgumentError(f"the Inception-v3 weights {weights_path} are not a local file "
                                f"(a copy of {INCEPTION_WEIGHTS_URL} is needed offline)")
        try:
            self.extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                         feature_extractor_weights_path=weights_path)
        except OSError as error:  # the download of the weights failed
            raise ArgumentError(f"cannot download the Inception-v3 weights ({error}): offline, pass weights_path, "
                                f"a local copy of {INCEPTION_WEIGHTS_URL}") from None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(2048-d pool features [B, 2048], unbiased logits [B, 1008]) of float images in [-1, 1] [B, 1 or 3, H, W].

        Preprocessing as §5: (x + 1) / 2 * 255 clipped to [0, 255], `clean_resize` to 299x299,
        uint8; grayscale images are repeated to the three channels Inception expects.
        """
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ArgumentError(f"images must have shape [batch, 1 or 3, height, width], got {tuple(images.shape)}")
        pixels = ((images.detach().float() + 1) / 2 * 255).clamp(0, 255)
        resized = clean_resize(pixels).expand(-1, 3, -1, -1)
        device = next(self.extractor.parameters()).device
        features, logits = self.extractor(resized.contiguous().to(device))
        return features, logits

    features = forward  # the interface of FeatureClassifier, so classifier_statistics takes either


DEFAULT_CLASSIFIER = "runs/fid-classifier"  # where `pgm fid-classifier` writes it


def load_feature_extractor(*, classifier: str | Path = DEFAULT_CLASSIFIER, inception: str | Path | None = None,
                           device="cpu") -> tuple[nn.Module, str]:
    """(the network whose features the Frechet distance compares, the metric's name): Inception-v3
    from its weights file (the standard FID), else the in-repo classifier saved in `classifier`."""
    if inception is not None:
        return InceptionFeatures(str(inception)).to(device), "FID (Inception-v3)"
    from ..hub import from_pretrained

    model = from_pretrained(classifier)
    if model.config.kind != "classifier":
        raise ArgumentError(f"{classifier} holds a {model.config.kind} model, not the feature classifier "
                            "(train one with pgm fid-classifier)")
    return model.to(device), "FD (classifier features)"
