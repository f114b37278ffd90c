"""Image evaluation: the codebook statistics and reconstruction quality of a VQ tokenizer, and the
quality of generated images (FD and IS under a feature extractor) beside the floor that the VQ
tokenizer puts under any model of its codes."""

from __future__ import annotations

import math
import time

import torch

from ..data.image_tokens import split_images
from ..data.images import to_unit_range
from ..models.base import check_ids
from ..sampling import SamplingOptions, generate_codes
from .fid import fd_classifier


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error on the [-1, 1] scale (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")


def code_statistics(codes: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(fraction of the codebook used, perplexity exp(entropy) of the code histogram) of `codes` (any shape)."""
    flat = codes.reshape(-1)
    if flat.numel() == 0:
        raise ValueError("code_statistics needs at least one code")
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
def image_quality(model, vq, data, data_config, extractor, *, num_samples: int, steps: int, sampler: str,
                  guidance: float, guidance_schedule: str, seed: int, batch_size: int = 64,
                  temperature: float = 1.0) -> dict:
    """FD and IS under `extractor`'s features (the in-repo classifier, or Inception) of
    `num_samples` generated images, labelled like the first validation images, against every
    real validation image; and the same for the VQ reconstructions of those validation images:
    the floor the tokenizer puts under any model of its codes."""
    real_images, _, _ = split_images(data_config, train_split=False)
    real = to_unit_range(real_images)
    count = min(num_samples, len(data.val))
    labels = data.val.labels_of(range(count)).tolist()
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    options = SamplingOptions(temperature=temperature)
    started = time.perf_counter()
    codes = torch.cat([generate_codes(model, torch.tensor(labels[start:start + batch_size]), steps=steps,
                                      sampler=sampler, guidance=guidance, guidance_schedule=guidance_schedule,
                                      options=options, generator=generator).cpu()
                       for start in range(0, count, batch_size)])
    images = vq.decode(codes)
    seconds = time.perf_counter() - started
    tokens, _ = data.val[list(range(count))]
    generated = fd_classifier(extractor, real, images)
    floor = fd_classifier(extractor, real, vq.decode(tokens[:, 1:]))
    return {"fd": generated["fd_classifier"], "is": generated["is_classifier"][0],
            "vq_floor_fd": floor["fd_classifier"], "vq_floor_is": floor["is_classifier"][0],
            "num_samples": count, "real_images": len(real_images), "images_per_s": count / seconds}
