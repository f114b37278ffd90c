"""What a generation request holds and what it gives back: `GenerationRequest` (the inputs, and
the sampler settings), `Samples`, the `StepEvent`s of a stream, and `Stream`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import SamplingError
from ..sampling.codes import REGIONS
from ..sampling.settings import SamplerSettings

VALIDATION_IMAGES = 10  # images completed by `known` when none are given
EVERY_CLASS = 16  # without classes, a model with at most this many samples every class


def _field(default, help: str, modality: str | None = None, **cli):
    return dataclasses.field(default=default, metadata={"help": help, "modality": modality, "cli": cli})


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """The arguments of `generate`, `sample` and `stream`: what to generate (these fields; `None`
    means the default, said in the help) and how (`settings`, whose fields are arguments of the
    same calls, flat: `steps=16` is `settings.steps`)."""

    prompt: str | list[str] | None = _field(
        None, "text to continue; several: one row each, decoded together (a ragged batch)", "text", action="append")
    infill: str | list[str] | None = _field(
        None, "text with gaps of N tokens written {{N}}; several: one row each", "text", action="append",
        metavar="TEMPLATE")
    num_samples: int | None = _field(
        None, "samples per prompt, template, class or known image (default 1; unconditional text: 1 sample)",
        type=int)
    length: int | None = _field(None, "tokens per sample, BOS included (default: the model's, or the template's)",
                                "text", type=int)
    seed: int = _field(0, "random seed: the same seed gives the same samples", type=int)
    stop_at_eos: bool = _field(False, "end each text at its first generated EOS", "text", action="store_true")
    mark: bool = _field(False, "wrap generated spans in [[ ]]", "text", action="store_true")
    classes: list | None = _field(None, "class numbers or names, none = unconditional (default: every class of a "
                                        f"model with at most {EVERY_CLASS})", "image", nargs="+", metavar="CLASS")
    known: str | None = _field(None, f"keep this region of each image and generate the rest: {', '.join(REGIONS)} "
                                     "(border: inpaint the centre; center: outpaint the border)", "image",
                               choices=REGIONS)
    images: Any = _field(None, "with known: the images to complete (PNG files; Python: PIL images or uint8 "
                               f"arrays), or a number N for the run's first N validation images (default "
                               f"{VALIDATION_IMAGES})", "image", nargs="+", metavar="IMAGE")
    settings: SamplerSettings = dataclasses.field(default_factory=SamplerSettings, metadata={"modality": None})

    @classmethod
    def from_arguments(cls, arguments: dict) -> "GenerationRequest":
        """A request of flat arguments, the settings' among them."""
        inputs, settings = SamplerSettings.split(arguments)
        names = [field.name for field in cls.inputs()]
        unknown = sorted(set(inputs) - set(names))
        if unknown:
            every = names + sorted(SamplerSettings.names())
            raise SamplingError(f"unknown argument {unknown[0]!r}; the arguments are {', '.join(every)}")
        return cls(**inputs, settings=settings)

    @classmethod
    def inputs(cls) -> list[dataclasses.Field]:
        """The fields of what to generate (the command line's flags besides the settings')."""
        return [field for field in dataclasses.fields(cls) if field.name != "settings"]

    def given(self, modality: str) -> list[str]:
        """The inputs of one modality that differ from their defaults."""
        def differs(value, default) -> bool:
            return value is not None if default is None else value is not default and value != default

        return [field.name for field in self.inputs() if field.metadata["modality"] == modality
                and differs(getattr(self, field.name), field.default)]

    def rows(self, every_class: int) -> int:
        """The samples this request asks for, counted from its inputs alone (nothing tokenized, decoded
        or allocated), so that a limit on them refuses it at no cost: `num_samples` for each prompt,
        template, class or image (`every_class`: the classes an image model takes when none are named)."""
        copies = positive("num_samples", self.num_samples, 1)
        texts = [strings(name, value) for name, value in (("prompt", self.prompt), ("infill", self.infill))
                 if value is not None]
        if texts:
            return copies * sum(len(items) for items in texts)
        if self.known is not None:
            images = VALIDATION_IMAGES if self.images is None else self.images
            return copies * (images if isinstance(images, int) and not isinstance(images, bool) else
                             len(images) if isinstance(images, (list, tuple)) else 1)
        if self.classes is not None:
            return copies * (len(self.classes) if isinstance(self.classes, (list, tuple)) else 1)
        return copies * max(every_class, 1)

    def check_types(self) -> None:
        """What a server passes is what a client sent: the plain arguments' types."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 64:
            raise SamplingError(f"seed must be an integer in [0, 2^64), got {self.seed!r}")
        for name in ("stop_at_eos", "mark"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingError(f"{name} must be true or false, got {getattr(self, name)!r}")


@dataclasses.dataclass
class Samples:
    """What one request produced. `outputs`: the texts, or the PIL images; `tokens`: ids [N, L]
    (images: VQ codes [N, grid^2]); `known`: which of them were given [N, L]; `generated`: how
    many were generated; `labels`: images' class labels; `originals`: the known images as the VQ
    reconstructs them, [N, C, H, W] in [-1, 1] (inpainting only); `settings`: the sampler and the
    other choices the request left to their defaults, resolved."""

    outputs: list
    tokens: torch.Tensor
    known: torch.Tensor
    steps: int
    seconds: float
    generated: int
    settings: dict = dataclasses.field(default_factory=dict)
    labels: list[int] | None = None
    images: torch.Tensor | None = None
    originals: torch.Tensor | None = None


@dataclasses.dataclass
class StepEvent:
    """One sampling step, as `stream` yields it: the positions each row committed at `step` (of
    `steps`), their token ids and, for text, their decoded pieces; for images the code grid so
    far ([N, grid, grid], -1 where still unknown). The last event has `done` set, no positions,
    and the finished `samples`."""

    step: int
    steps: int
    elapsed: float
    positions: list[list[int]]
    tokens: list[list[int]]
    pieces: list[list[str]] | None = None
    codes: torch.Tensor | None = None
    done: bool = False
    samples: Samples | None = None

    @classmethod
    def of(cls, committed: list[list[tuple[int, int]]], step: int, steps: int, elapsed: float, **extra) -> "StepEvent":
        """The event of one step's (position, token) pairs per row (`StepUpdate.committed()`)."""
        return cls(step, steps, elapsed, [[p for p, _ in row] for row in committed],
                   [[t for _, t in row] for row in committed], **extra)

    def to_dict(self) -> dict:
        """The event as JSON-ready values (a server's message), and of the finished samples the texts,
        the timing and the settings. Images and the code grid are left to the caller to render."""
        values = {"step": self.step, "steps": self.steps, "elapsed": self.elapsed, "positions": self.positions,
                  "tokens": self.tokens, "done": self.done}
        if self.pieces is not None:
            values["pieces"] = self.pieces
        if self.samples is not None:
            samples = self.samples
            if all(isinstance(output, str) for output in samples.outputs):
                values["texts"] = samples.outputs
            values.update(seconds=samples.seconds, generated=samples.generated, settings=samples.settings)
            if samples.labels is not None:
                values["labels"] = samples.labels
        return values


class Stream:
    """The events of one request (see `Pipeline.stream`): an iterator of `StepEvent`s whose
    `close()` stops the work. `given` is what is known before the first step, as an event of step
    -1: each row's BOS and prompt or template tokens, or an image's kept cells; `length` is the
    positions of a row (text: the BOS included; images: the cells)."""

    def __init__(self, given: StepEvent, length: int, events: Iterator[StepEvent]):
        self.given, self.length, self._events = given, length, events

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> StepEvent:
        return next(self._events)

    def close(self) -> None:
        self._events.close()


def positive(name: str, value, default=None):
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SamplingError(f"{name} must be a positive integer, got {value!r}")
    return value


def strings(name: str, value) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(item, str) for item in items):
        raise SamplingError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
    for number, item in enumerate(items, 1):
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as error:  # a lone surrogate: what Python makes of bytes that are not UTF-8
            which = f"item {number} of {name}" if len(items) > 1 else name
            raise SamplingError(f"{which} is not valid text: character {error.start} is not Unicode (bytes that are "
                                "not UTF-8?)") from None
    return list(items)


def known_pairs(tokens: torch.Tensor, known: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(position, token) pairs of the known entries of each row."""
    return [[(p, t) for p, (t, k) in enumerate(zip(row, kept)) if k] for row, kept in zip(tokens.tolist(),
                                                                                          known.tolist())]


def settings_of(arguments: dict) -> SamplerSettings:
    """The sampler settings among keyword arguments that may hold nothing else."""
    others, settings = SamplerSettings.split(arguments)
    if others:
        raise SamplingError(f"unknown argument {sorted(others)[0]!r}; the sampler settings are "
                            f"{', '.join(sorted(SamplerSettings.names()))}")
    return settings
