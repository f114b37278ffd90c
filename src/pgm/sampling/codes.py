"""Class-conditional image generation from a PGM or a MaskGIT over VQ codes.

Both go through the one sampling loop of `pgm.sampling.pgm`: the PGM through its efficient
view (only clean codes enter the encoder, only this step's cells the decoder), MaskGIT through
the masked view (the full grid, unknown cells holding the mask id, every step).

Samplers (the authors' image settings by default):
- "halton": cells are decoded in the Halton order of the grid (a low-discrepancy sequence, so
  each step's cells are spread over the image), `arccos` counts per step;
- "confidence": each step draws every unknown cell and keeps the most confident ones, with
  Gumbel noise on the log-confidence annealed from `confidence_noise` to 0. It uses the same
  arccos counts as "halton" (the authors' confidence samplers use a slightly different
  linspace-based variant of the schedule, and do not scale the first step's temperature).
Guidance is ramped linearly from 0 to w by default ("constant" keeps w every step), and the
first step draws at twice the temperature (the authors halve the first step's logits).

Departures from the authors' samplers, on purpose: MaskGIT never re-draws cells it has already
decoded (upstream Halton-MaskGIT today; the PGM paper's baseline re-drew them each step), and
the PGM's inference view does not hide the newest clean token (the released image PGM's
off-by-one, image-stack §3.5). `redraw=True` and `hide_newest=True` reproduce the authors' samplers.

Known cells (inpainting: the surroundings are known; outpainting: the centre is) start in the
clean set and are never changed.
"""

from __future__ import annotations

import functools

import torch

from ..errors import SamplingError
from .common import run_to_end
from .pgm import iterate_pgm
from .settings import SamplerSettings

REGIONS = ("top", "bottom", "left", "right", "border", "center")  # what `region_mask` keeps


def radical_inverse(index: int, base: int) -> float:
    """The van der Corput radical inverse of `index` in `base` (digits mirrored after the point)."""
    value, scale = 0.0, 1.0 / base
    while index:
        index, digit = divmod(index, base)
        value += digit * scale
        scale /= base
    return value


def halton_order(grid_size: int) -> torch.Tensor:
    """The grid's cells [grid^2] (raster indices row * grid + col) in Halton order: points
    (radical inverse base 2, base 3) of indices 1, 2, ... scaled to the grid, each cell at its
    first visit. For a 32 x 32 grid this starts 522, 277, 771, 142, 664, 391, 913, 92."""
    return torch.tensor(_halton_cells(grid_size), dtype=torch.long)


@functools.lru_cache(maxsize=8)
def _halton_cells(grid_size: int) -> tuple[int, ...]:
    # Computed once per grid size: 8 ms of Python for 32 x 32, otherwise paid by every batch.
    seen, order, index = set(), [], 1
    cells = grid_size * grid_size
    while len(order) < cells:
        row = int(radical_inverse(index, 2) * grid_size)
        col = int(radical_inverse(index, 3) * grid_size)
        cell = row * grid_size + col
        if cell not in seen:
            seen.add(cell)
            order.append(cell)
        index += 1
    return tuple(order)


def region_mask(grid_size: int, region: str) -> torch.Tensor:
    """Bool [grid, grid]: the cells KEPT (known) for a named region. "top", "bottom", "left",
    "right": that half is kept and the rest generated; "border": the centre is generated
    (inpainting); "center": the centre is kept and the border generated (outpainting)."""
    keep = torch.zeros(grid_size, grid_size, dtype=torch.bool)
    half, quarter = grid_size // 2, grid_size // 4
    if region == "top":
        keep[:half] = True
    elif region == "bottom":
        keep[half:] = True
    elif region == "left":
        keep[:, :half] = True
    elif region == "right":
        keep[:, half:] = True
    elif region in ("border", "center"):
        keep[quarter:grid_size - quarter, quarter:grid_size - quarter] = True
        if region == "border":
            keep = ~keep
    else:
        raise SamplingError(f"region must be top, bottom, left, right, border or center, got {region!r}")
    return keep


def generate_codes(model, labels: torch.Tensor, **options) -> torch.Tensor:
    """VQ codes [B, grid^2]: `iterate_codes` run to its end (same options)."""
    return run_to_end(iterate_codes(model, labels, **options))


@torch.no_grad()
def iterate_codes(model, labels: torch.Tensor, *, settings: SamplerSettings = SamplerSettings(),
                  known_codes: torch.Tensor | None = None, known_cells: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, compile: str | None = None, stats: dict | None = None,
                  view: str | None = None, first_step_temperature_scale: float = 2.0, confidence_noise: float = 5.0):
    """VQ codes [B, grid^2] of one image per label (labels [B]; the null class = unconditional): a
    generator that yields a `StepUpdate` after every step, its positions counted in grid cells
    (row-major), and returns the codes.

    `settings`: steps, sampler (halton or confidence), guidance and its schedule, temperature,
    the PGM's encoder cache, and `hide_newest` (PGM) and `redraw` (MaskGIT), which reproduce the
    authors' released samplers (see `iterate_pgm`); resolved here unless they already are.
    known_codes/known_cells [B, grid^2] fix some cells (inpainting and outpainting). `compile`: a
    torch.compile mode for the network. `view` overrides the model's sampling view (the PGM's
    "reference" view is for tests); `first_step_temperature_scale` and `confidence_noise` are the
    authors' (see `iterate_pgm`).
    """
    config = model.config
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(device)
    batch = labels.shape[0]
    if config.kind == "maskgit":
        cells, offset, view = config.length, 0, view or "masked"
        codebook = config.codebook_size
    elif config.kind == "pgm" and config.num_classes:
        cells, offset, view = config.length - 1, 1, view or "efficient"  # position 0 holds the BOS
        codebook = config.mask_token_id
        if config.vocab_size != codebook + 2:
            raise SamplingError(f"an image PGM's vocabulary is the codes, the mask and the BOS: vocab_size must be "
                                f"mask_token_id + 2 = {codebook + 2}, got {config.vocab_size}")
    else:
        raise SamplingError(f"image generation needs a class-conditional pgm or a maskgit model, not {config.kind}")
    grid = round(cells ** 0.5)
    known_tokens = torch.zeros(batch, offset + cells, dtype=torch.long, device=device)
    known_mask = torch.zeros_like(known_tokens, dtype=torch.bool)
    if offset:
        known_tokens[:, 0], known_mask[:, 0] = codebook + 1, True
    if (known_codes is None) != (known_cells is None):
        raise SamplingError("known_codes and known_cells must be given together")
    if known_codes is not None:
        if known_codes.shape != (batch, cells) or known_cells.shape != (batch, cells):
            raise SamplingError(f"known_codes and known_cells must be [{batch}, {cells}], got "
                                f"{tuple(known_codes.shape)} and {tuple(known_cells.shape)}")
        known_tokens[:, offset:] = torch.where(known_cells.to(device), known_codes.to(device), 0)
        known_mask[:, offset:] = known_cells.to(device)
    unknown = cells - int(known_mask[:, offset:].sum(1).min())
    settings = settings.resolve(config.kind, "image", unknown=unknown, compile=compile)
    confidence = settings.sampler == "confidence"
    order = "confidence" if confidence else torch.cat([torch.arange(offset), halton_order(grid) + offset]).to(device)
    updates = iterate_pgm(model, known_tokens=known_tokens, known_mask=known_mask, steps=settings.steps,
                          counts="arccos", order=order, options=settings.options, generator=generator, cond=labels,
                          guidance=settings.guidance, guidance_schedule=settings.guidance_schedule,
                          first_step_temperature_scale=first_step_temperature_scale,
                          confidence_noise=confidence_noise if confidence else 0.0,
                          suppress=(codebook, codebook + 1) if offset else (codebook,), view=view,
                          hide_newest=settings.hide_newest, redraw=settings.redraw, **settings.cache, compile=compile,
                          stats=stats)
    while True:
        try:
            update = next(updates)
        except StopIteration as stop:
            return stop.value[:, offset:]
        if offset:  # the PGM's position 0 is the BOS
            update.positions = update.positions - offset
        yield update
