"""Following a run live besides RUN/metrics.jsonl: TensorBoard or Weights & Biases (`train.logger`).

A `Tracker` receives the numbers of every metrics record at the record's step and, at each
validation, a few samples of the averaged weights: decoded texts, or one grid of images. Only the
first process tracks; every other process gets the plain `Tracker`, which does nothing.

    RUN/tensorboard/      TensorBoard's event files (`tensorboard --logdir RUN/tensorboard`)
    RUN/wandb/            W&B's run directories (one per start of the process; `wandb sync` uploads
                          an offline one)
    RUN/wandb-run-id      the W&B run's id, so that `--resume` continues the same W&B run

W&B reads its project, entity, mode and the rest from its own environment variables
(WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE=offline, ...); the run is named after the run directory
unless WANDB_NAME says otherwise.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch

from .data.image_sets import to_unit_range
from .errors import MissingDependency, RunError
from .eval.perplexity import seed_for
from .formats import write_atomic
from .generation import decode_samples, iterate_text, known_from_text
from .models import is_image_model
from .pictures import grid_picture
from .sampling import iterate_codes
from .sampling.common import run_to_end
from .sampling.settings import SamplerSettings
from .train_config import TrainConfig
from .vq_tokenizer import vq_tokenizer_for_data

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb-run-id"
# The step is each logged value's x axis, and both loggers stamp every value with the wall clock
# themselves; `elapsed_s` (the run's own clock, kept across resumes) is logged as a number.
NOT_SCALARS = ("step", "time")
# Samples are for looking at, so they only need to be cheap next to a validation: a short text
# (the model's length when it is shorter), a few decoding steps (an AR model takes one per token).
SAMPLE_TOKENS = 64
SAMPLE_STEPS = 8
SAMPLE_RULE = "\n\n---\n\n"  # between two samples in TensorBoard's text


class Tracker:
    """Where a run's numbers and samples go besides metrics.jsonl; this one sends them nowhere
    (train.logger=none, and every process but the first)."""

    active = False  # whether samples are worth drawing for it

    def start(self, run_dir: Path, step: int, config: dict) -> None:
        """Open the run's log at `step` (0, or the checkpoint a resumed run continues from)."""

    def scalars(self, record: dict, step: int) -> None:
        """The numbers of a metrics record (all but `NOT_SCALARS`), at `step`."""

    def texts(self, name: str, texts: list[str], step: int) -> None:
        """A few texts under one name, at `step`."""

    def image(self, name: str, picture, step: int) -> None:
        """One PIL image, at `step`."""

    def close(self, failed: bool = False) -> None:
        """Write out everything logged; `failed` says the run stopped on an error or an interrupt."""


def numbers_of(record: dict) -> dict[str, float]:
    return {key: float(value) for key, value in record.items()
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TensorBoardTracker(Tracker):
    """Event files under RUN/tensorboard/, through `torch.utils.tensorboard.SummaryWriter`."""

    active = True

    def __init__(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingDependency("train.logger=tensorboard needs the tensorboard package: "
                                    "pip install 'partition-gm[tensorboard]'") from None
        self.writer_class, self.writer = SummaryWriter, None

    def start(self, run_dir: Path, step: int, config: dict) -> None:
        # A resumed run replays the steps after its checkpoint: what a crashed process logged for
        # them is purged, as metrics.jsonl forgets it.
        self.writer = self.writer_class(log_dir=str(Path(run_dir) / TENSORBOARD_DIR),
                                        purge_step=step + 1 if step else None)

    def scalars(self, record: dict, step: int) -> None:
        for name, value in numbers_of(record).items():
            self.writer.add_scalar(name, value, step)

    def texts(self, name: str, texts: list[str], step: int) -> None:
        # TensorBoard renders text as Markdown: each sample indented as a code block shows as written,
        # and a rule between two samples keeps them apart (blank lines would join their blocks).
        blocks = ["\n".join("    " + line for line in text.split("\n")) for text in texts]
        self.writer.add_text(name, SAMPLE_RULE.join(blocks), step)

    def image(self, name: str, picture, step: int) -> None:
        pixels = np.asarray(picture)
        self.writer.add_image(name, pixels, step, dataformats="HW" if pixels.ndim == 2 else "HWC")

    def close(self, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker(Tracker):
    """A W&B run in RUN/wandb/ whose id RUN/wandb-run-id keeps across resumes."""

    active = True

    def __init__(self):
        try:
            import wandb
        except ImportError:
            raise MissingDependency("train.logger=wandb needs the wandb package: pip install "
                                    "'partition-gm[wandb]'") from None
        self.wandb, self.run = wandb, None

    def start(self, run_dir: Path, step: int, config: dict) -> None:
        run_dir = Path(run_dir)
        id_file = run_dir / WANDB_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            write_atomic(id_file, (run_id + "\n").encode())
        # Arguments to wandb.init override W&B's environment, so project and name are passed only as
        # the defaults for when WANDB_PROJECT and WANDB_NAME are unset. A resumed run may change the
        # resumable settings (max_steps, ...), which W&B refuses to overwrite unless allowed.
        self.run = self.wandb.init(dir=str(run_dir), id=run_id, resume="allow", config=config,
                                   project=os.environ.get("WANDB_PROJECT") or "partition-gm",
                                   name=os.environ.get("WANDB_NAME") or run_dir.name, allow_val_change=True)

    def scalars(self, record: dict, step: int) -> None:
        self.run.log(numbers_of(record), step=step)

    def texts(self, name: str, texts: list[str], step: int) -> None:
        self.run.log({name: self.wandb.Table(columns=["sample"], data=[[text] for text in texts])}, step=step)

    def image(self, name: str, picture, step: int) -> None:
        self.run.log({name: self.wandb.Image(picture)}, step=step)

    def close(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def tracker_for(settings: TrainConfig, main: bool) -> Tracker:
    """The tracker `train.logger` names, for the first process (a plain `Tracker` for the others
    and for `none`): its package is imported here, so that a missing one stops the run before
    any work."""
    if settings.logger != "none" and settings.log_samples and settings.parallel == "fsdp":
        # Sampling runs the model on the first process alone; a sharded model runs on all of them at once.
        raise RunError("train.log_samples draws samples on the first process only, which a sharded model "
                       "(train.parallel=fsdp) cannot do: set train.log_samples=0")
    if settings.logger == "none" or not main:
        return Tracker()
    return TRACKERS[settings.logger]()


@torch.no_grad()
def text_samples(model, tokenizer, count: int, generator: torch.Generator) -> list[str]:
    """`count` short unconditional samples of a text model, decoded."""
    config = model.config
    known_tokens, known_mask = known_from_text(tokenizer, length=min(config.length, SAMPLE_TOKENS),
                                               max_length=config.length, copies=count)
    return decode_samples(_drawn(model, known_tokens, known_mask, generator), tokenizer, known_mask)


@torch.no_grad()
def answers(model, tokenizer, rows, count: int, generator: torch.Generator) -> list[str]:
    """A text model's answers to the prompts of the first `count` rows of pairs (each prompt, then
    what the model puts after it, to its first EOS)."""
    indices = list(range(min(count, len(rows))))
    tokens, _ = rows[indices]
    known_mask = torch.arange(tokens.shape[1])[None, :] < rows.given_of(indices)[:, None]
    return decode_samples(_drawn(model, tokens, known_mask, generator), tokenizer, known_mask, stop_at_eos=True)


def _drawn(model, known_tokens: torch.Tensor, known_mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The rows with their unknown positions drawn in a few steps (an AR model takes one per token)."""
    unknown = int((~known_mask).sum(1).max())
    settings = SamplerSettings(steps=None if model.config.kind == "ar" else min(SAMPLE_STEPS, unknown))
    return run_to_end(iterate_text(model, known_tokens=known_tokens, known_mask=known_mask, settings=settings,
                                   generator=generator)).cpu()


@torch.no_grad()
def image_samples(model, vq, classes: int, count: int, generator: torch.Generator):
    """One row of `count` samples of a class-conditional image model (classes in turn), decoded by
    the VQ tokenizer `vq`."""
    labels = torch.arange(count) % classes
    codes = run_to_end(iterate_codes(model, labels, settings=SamplerSettings(steps=SAMPLE_STEPS), generator=generator))
    return grid_picture(vq.decode(codes), columns=count)


@torch.no_grad()
def reconstructions(model, pixels: torch.Tensor):
    """A VQ autoencoder's `pixels` rows (uint8) over their reconstructions, as one grid."""
    config = model.config
    images = to_unit_range(pixels).view(len(pixels), config.in_channels, config.image_size, config.image_size)
    rebuilt = model(images.to(next(model.parameters()).device)).reconstruction.float().cpu()
    return grid_picture(torch.cat([images, rebuilt.clamp(-1, 1)]), columns=len(pixels))


class SampleLogger:
    """At each validation, `count` samples of the model as it is to the tracker: texts for a text
    model (its answers to validation prompts, for pairs), a grid of images for an image model (the VQ tokenizer decodes them, loaded once), and
    validation images over their reconstructions for a VQ autoencoder. Each validation's samples
    are drawn with a generator of its own step, so that a resumed run draws what it would have."""

    def __init__(self, tracker: Tracker, count: int, seed: int):
        self.tracker, self.count, self.seed = tracker, count, seed
        self.vq = None

    def __call__(self, model, data, data_config, step: int, device: torch.device) -> None:
        if not (self.tracker.active and self.count):
            return
        training = model.training
        model.eval()
        try:
            generator = torch.Generator(device=device).manual_seed(seed_for(self.seed, step, 0, 3))
            if model.config.kind == "vq":
                pixels, _ = data.val[list(range(min(self.count, len(data.val))))]
                self.tracker.image("reconstructions", reconstructions(model, pixels), step)
            elif is_image_model(model.config):
                if self.vq is None:
                    self.vq = vq_tokenizer_for_data(data_config)
                    self.vq.model.to(device)
                classes = len(data.meta.get("classes", [])) or model.config.num_classes
                self.tracker.image("samples", image_samples(model, self.vq, classes, self.count, generator), step)
            elif data.val.given is not None:  # pairs: a model that answers prompts, asked a few
                self.tracker.texts("answers", answers(model, data.tokenizer, data.val, self.count, generator), step)
            else:
                self.tracker.texts("samples", text_samples(model, data.tokenizer, self.count, generator), step)
        finally:
            model.train(training)


__all__ = ["Tracker", "TensorBoardTracker", "WandbTracker", "tracker_for", "SampleLogger", "text_samples",
           "answers", "TENSORBOARD_DIR", "WANDB_ID_FILE"]
