"""One way in: `pgm.load(source)` gives a pipeline that holds a model with everything it needs to
turn requests into samples: its tokenizer (text) or its VQ tokenizer (images), the device and
the precision.

    pipe = pgm.load("runs/text-small")
    pipe.generate(prompt="The Emperor Napoleon", steps=32)          # -> [str]
    pipe.generate(infill="It was {{10}} night.", num_samples=2)     # -> [str, str]
    for event in pipe.stream(steps=16): ...                         # one StepEvent per step
    pipe.score(["Some text."])                                      # -> [TextScore]

    pipe = pgm.load("runs/fmnist-pgm")
    pipe.generate(classes=["sneaker", "bag"], guidance=3)           # -> [PIL.Image, PIL.Image]

`source` is a run directory, a pretrained directory, one of the authors' checkpoint files or a
Hub id (see `pgm.hub`). Every request is checked here, once, for the command line, Python and
any server alike: an argument that does not apply to the model, a value out of range or a
malformed template is one sentence (a ValueError), never a silent default. The argument names
are the command line's flags (`num_samples` is `--num-samples`), with the same defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import data_directory, load_prepared, load_tokenizer
from .data.images import fit_size, to_uint8
from .data.tokenizers import named_tokenizer
from .formats import TOKENIZER_DIR, replaced_directory, write_json
from .devices import Precision, autocast, describe_precision, resolve_device, synchronize
from .eval import generative_perplexity, load_evaluator, score_sequences, validation_elbo
from .eval.fid import DEFAULT_CLASSIFIER, FeatureStatistics, frechet_distance, inception_score, load_feature_extractor
from .eval.images import (image_quality, reconstruction_quality, reference_labels, reference_statistics,
                          sharded_features, spread_labels)
from .generation import check_text_sampler, decode_samples, iterate_text, known_from_text
from .hub import from_pretrained
from .image_generation import parse_classes, region_cells
from .models import is_image_model
from .objectives import objective_for
from .runs import read_run_config
from .sampling import SamplingOptions, StepUpdate, generate_codes, iterate_codes, run_to_end
from .sampling.image import IMAGE_SAMPLERS, REGIONS
from .sampling.compiled import check_compile_mode
from .sampling.pgm import NEVER, check_cache_refresh, refresh_interval
from .vq_tokenizer import VQTokenizer, load_vq_tokenizer

TEXT_STEPS = 128  # default steps: min(positions to generate, 128)
IMAGE_STEPS = 32
VALIDATION_IMAGES = 10  # images completed by `known` when none are given
EVERY_CLASS = 16  # without classes, a model with at most this many samples every class


def _field(default, help: str, modality: str | None = None, **cli):
    return dataclasses.field(default=default, metadata={"help": help, "modality": modality, "cli": cli})


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """The arguments of `generate`, `sample` and `stream`. `None` means the default (said in the help)."""

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
    steps: int | None = _field(None, f"decoding steps (default: text min(positions, {TEXT_STEPS}), images "
                                     f"{IMAGE_STEPS}; an autoregressive model takes one per token)", type=int)
    order: str | None = _field(None, "PGM decoding order: random (default), left-to-right, confidence, margin, "
                                     "entropy", "text")
    sampler: str | None = _field(None, "pgm: uniform (default), binomial, reference; mdlm: ancestral, "
                                       "ancestral-nocache, ancestral-full (logits at every position, as the paper's "
                                       "MDLM); ar: kv-cache, no-cache; images: halton (default), confidence")
    temperature: float = _field(1.0, "sampling temperature (0: greedy)", type=float)
    top_p: float = _field(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability",
                          type=float)
    seed: int = _field(0, "random seed: the same seed gives the same samples", type=int)
    stop_at_eos: bool = _field(False, "end each text at its first generated EOS", "text", action="store_true")
    mark: bool = _field(False, "wrap generated spans in [[ ]]", "text", action="store_true")
    float32: bool = _field(False, "draw from a float32 instead of a float64 cumulative distribution",
                           action="store_true")
    classes: list | None = _field(None, "class numbers or names, none = unconditional (default: every class of a "
                                        f"model with at most {EVERY_CLASS})", "image", nargs="+", metavar="CLASS")
    guidance: float | None = _field(None, "classifier-free guidance weight w (default 0)", "image", type=float)
    guidance_schedule: str | None = _field(None, "ramp w up from 0 over the steps (linear, the default, as the "
                                                 "authors) or keep it (constant)", "image",
                                           choices=("linear", "constant"))
    known: str | None = _field(None, f"keep this region of each image and generate the rest: {', '.join(REGIONS)} "
                                     "(border: inpaint the centre; center: outpaint the border)", "image",
                               choices=REGIONS)
    images: Any = _field(None, "with known: the images to complete (PNG files; Python: PIL images or uint8 "
                               f"arrays), or a number N for the run's first N validation images (default "
                               f"{VALIDATION_IMAGES})", "image", nargs="+", metavar="IMAGE")
    hide_newest: bool = _field(False, "image PGM: hide the newest clean token at every step, as the authors' released "
                                      "image PGM does (an off-by-one their FIDs were measured with)", "image",
                               action="store_true")
    cache_refresh: int | str | None = _field(
        None, "PGM: keep each clean token's encoder states between steps (faster, approximate) and re-encode the "
              f"whole clean set every N steps, or {NEVER!r}; 1 is exact sampling (default: no cache)",
        type=refresh_interval, metavar="N")
    cache_growth: float | None = _field(None, "with cache_refresh: also re-encode when the clean set has grown by "
                                              "this fraction since the last full encoding (e.g. 0.5)", type=float)
    redraw: bool = _field(False, "MaskGIT: draw every decoded cell again at each step, as the PGM paper's MaskGIT "
                                 "baseline did (upstream Halton-MaskGIT, the default, draws only the new cells)",
                          "image", action="store_true")

    @classmethod
    def from_arguments(cls, arguments: dict) -> "GenerationRequest":
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(arguments) - set(names))
        if unknown:
            raise ValueError(f"unknown argument {unknown[0]!r}; the arguments are {', '.join(names)}")
        return cls(**arguments)

    def given(self, modality: str) -> list[str]:
        """The arguments of one modality that differ from their defaults."""
        def differs(value, default) -> bool:
            return value is not None if default is None else value is not default and value != default

        return [field.name for field in dataclasses.fields(self) if field.metadata["modality"] == modality
                and differs(getattr(self, field.name), field.default)]


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


def _positive(name: str, value, default=None):
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _strings(name: str, value) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(item, str) for item in items):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
    return list(items)


class Pipeline:
    """A model, its tokenizer, the device and the precision (see the module's doc).

    `modality` is "text", "image" or "vq"; `run` is the run directory the model came from (its
    validation data is what `validation` scores), or None."""

    modality = ""

    def __init__(self, model, tokenizer, device: torch.device, precision: Precision = "auto", name: str = "",
                 compile: str | None = None):
        self.model, self.tokenizer, self.device, self.precision = model, tokenizer, device, precision
        self.compile = compile  # the torch.compile mode of the sampling network, None: eager
        origin = model.origin
        self.source = origin.source if origin else ""  # the file or checkpoint the weights came from
        self.name = name or self.source  # what the pipeline was loaded from, as given
        self.run = origin.run_dir if origin else None
        self._data = None

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> str:
        return describe_precision(self.device, self.precision)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__}: {self.config.kind}, {self.model.num_parameters() / 1e6:.2f}M parameters, "
                f"on {self.device} ({self.dtype}), from {self.name}>")

    def autocast(self):
        return autocast(self.device, self.precision)

    # --- generation ---------------------------------------------------------------------------

    def generate(self, **arguments) -> list:
        """Texts (text models) or PIL images (image models) for a request; see `GenerationRequest`."""
        return self.sample(**arguments).outputs

    def sample(self, **arguments) -> Samples:
        """`generate`, with the tokens and the timing."""
        plan = self._plan(GenerationRequest.from_arguments(arguments))
        synchronize(self.device)
        started = time.perf_counter()
        with self.autocast():
            tokens = run_to_end(plan.updates())
        synchronize(self.device)
        return plan.finish(tokens, time.perf_counter() - started)

    def stream(self, **arguments) -> Stream:
        """The request of `generate`, one `StepEvent` per step, then a last event with the samples
        (a `Stream`: `given` holds the known tokens). Closing it stops the work. The checks run here,
        before the first step."""
        plan = self._plan(GenerationRequest.from_arguments(arguments))
        return Stream(plan.given(), plan.length, self._stream(plan))

    def _stream(self, plan: "_Plan") -> Iterator[StepEvent]:
        started = time.perf_counter()
        updates = plan.updates()
        while True:
            try:
                with self.autocast():
                    update = next(updates)
            except StopIteration as stop:
                samples = plan.finish(stop.value, time.perf_counter() - started)
                yield StepEvent(plan.steps, plan.steps, samples.seconds, [], [], done=True, samples=samples)
                return
            yield plan.event(update, time.perf_counter() - started)

    def _plan(self, request: GenerationRequest) -> "_Plan":
        raise ValueError(f"{self.name} holds a {self.config.kind} model, which does not generate")

    def _refuse(self, request: GenerationRequest, other: str) -> None:
        given = request.given(other)
        if given:
            article = "an" if self.modality == "image" else "a"
            raise ValueError(f"{given[0]} applies to {other} models; {self.name} holds {article} {self.modality} "
                             f"{self.config.kind} model")

    def _network(self, refresh, growth) -> dict:
        """How the sampling network runs: the encoder-cache arguments (cache_refresh, cache_growth),
        checked against the model, and the pipeline's compile mode."""
        check_cache_refresh(refresh, growth)
        if refresh is not None and self.config.kind != "pgm":
            raise ValueError(f"the encoder cache (cache_refresh) is for PGM models; {self.name} holds a "
                             f"{self.config.kind} model")
        if refresh is not None and self.compile:
            raise ValueError(f"the encoder cache (cache_refresh) is not compiled; {self.name} was loaded with "
                             f"compile={self.compile!r}")
        return {"cache_refresh": refresh, "cache_growth": growth, "compile": self.compile}

    def _options(self, request: GenerationRequest) -> SamplingOptions:
        """The sampling options of a request, with the types of its plain arguments checked (a
        server passes what a client sent)."""
        for name in ("temperature", "top_p"):
            value = getattr(request, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if isinstance(request.seed, bool) or not isinstance(request.seed, int):
            raise ValueError(f"seed must be an integer, got {request.seed!r}")
        for name in ("stop_at_eos", "mark", "float32", "hide_newest", "redraw"):
            if not isinstance(getattr(request, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(request, name)!r}")
        return SamplingOptions(temperature=float(request.temperature), top_p=float(request.top_p),
                               float64=not request.float32)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    # --- evaluation ---------------------------------------------------------------------------

    @property
    def data(self):
        """The prepared data (rows, tokenizer, meta) of the run the model came from."""
        if self._data is None:
            self._data = load_prepared(data_directory(self._run(), self.run_config.data))
        return self._data

    @property
    def run_config(self):
        """The configuration of the run the model came from."""
        return read_run_config(self._run())

    def _run(self) -> Path:
        if self.run is None:
            raise ValueError(f"{self.name} is not a training run, so it has no validation data to evaluate on")
        return self.run

    def validation(self, *, passes: int = 4, rows: int = 0, batch_size: int = 32, seed: int = 0):
        """The validation ELBO of the run's validation rows (the first `rows`, 0: all) over `passes`
        Monte-Carlo passes (an autoregressive model and a VQ are exact in one)."""
        _positive("passes", passes)
        _positive("batch_size", batch_size)
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"rows must be a non-negative integer (0: all), got {rows!r}")
        data = self.data
        exact = self.config.kind in ("ar", "vq")
        indices = range(min(rows, len(data.val))) if rows else None
        return validation_elbo(self.model, objective_for(self.model), data.val, indices=indices,
                               batch_size=batch_size, passes=1 if exact else passes, seed=seed, device=self.device,
                               autocast=self.autocast,
                               bos_always_clean=self.run_config.train.bos_always_clean)

    def save_pretrained(self, directory: str | Path) -> Path:
        """The model with its tokenizer and model card, as a pretrained directory."""
        return self.model.save_pretrained(directory, self.tokenizer)


@dataclasses.dataclass
class _Plan:
    """A checked request: `updates()` starts its sampling loop, `finish` turns the loop's result into
    `Samples`, `event` one of its updates into a `StepEvent`, `given()` is the event of the known
    tokens; `length` is the positions of a row."""

    steps: int
    length: int
    updates: Any
    finish: Any
    event: Any
    given: Any


class TextPipeline(Pipeline):
    """PGM, MDLM and AR text models: prompts, infilling, orders; `score`."""

    modality = "text"

    def _plan(self, request: GenerationRequest) -> _Plan:
        self._refuse(request, "image")
        config, kind = self.config, self.config.kind
        copies = _positive("num_samples", request.num_samples, 1)
        prompts = _strings("prompt", request.prompt) if request.prompt is not None else []
        templates = _strings("infill", request.infill) if request.infill is not None else []
        if templates and kind == "ar":
            raise ValueError("an autoregressive model can only continue a prompt; infilling needs a PGM or MDLM")
        order = request.order or "random"
        sampler = check_text_sampler(kind, request.sampler, order)
        length = request.length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int)):
            raise ValueError(f"length must be an integer, got {length!r}")
        known_tokens, known_mask = known_from_text(self.tokenizer, length=length, max_length=config.length,
                                                   prompts=prompts, templates=templates, copies=copies)
        unknown = int((~known_mask).sum(1).max())
        steps = self._steps(request.steps, unknown, sampler)
        options = self._options(request)
        network = self._network(request.cache_refresh, request.cache_growth)
        if sampler == "reference" and request.cache_refresh is not None:
            raise ValueError("the reference sampler runs the training view, which has no encoder cache")
        if sampler == "reference" and self.compile:
            raise ValueError(f"the reference sampler is the slow check of the efficient one and is not compiled; "
                             f"{self.name} was loaded with compile={self.compile!r}")

        def updates():
            return iterate_text(self.model, known_tokens=known_tokens, known_mask=known_mask, steps=steps,
                                sampler=sampler, order=order, options=options,
                                generator=self._generator(request.seed), **network)

        def finish(tokens, seconds):
            tokens = tokens.cpu()
            texts = decode_samples(tokens, self.tokenizer, known_mask, stop_at_eos=request.stop_at_eos,
                                   mark_generated=request.mark)
            return Samples(texts, tokens, known_mask, steps, seconds, int((~known_mask).sum()),
                           settings={"sampler": sampler, "order": order, "num_samples": copies, **network})

        def text_event(committed: list[list[tuple[int, int]]], step: int, elapsed: float) -> StepEvent:
            return StepEvent.of(committed, step, steps, elapsed,
                                pieces=[[self.tokenizer.decode([t]) for _, t in row] for row in committed])

        def event(update: StepUpdate, elapsed: float) -> StepEvent:
            return text_event(update.committed(), update.step, elapsed)

        def given() -> StepEvent:
            return text_event(_known_pairs(known_tokens, known_mask), -1, 0.0)

        return _Plan(steps, known_tokens.shape[1], updates, finish, event, given)

    def _steps(self, steps, unknown: int, sampler: str) -> int:
        kind = self.config.kind
        if kind == "ar":
            if steps is not None:
                raise ValueError("an autoregressive model decodes one token per step; steps does not apply to it")
            return unknown
        steps = _positive("steps", steps, min(unknown, TEXT_STEPS))
        if kind == "pgm" and sampler != "binomial" and steps > unknown:
            raise ValueError(f"steps {steps} is more than the {unknown} positions to generate: a PGM decodes at "
                             "least one position per step (the binomial sampler may take more steps)")
        return steps

    def score(self, texts, *, passes: int = 1, batch_size: int = 32, seed: int = 0) -> list:
        """How likely the model finds each text (after a BOS): a `TextScore` per text, the ELBO
        bound for PGM and MDLM (averaged over `passes` antithetic Monte-Carlo draws), the exact NLL
        for AR."""
        texts = _strings("texts", texts)
        _positive("passes", passes)
        _positive("batch_size", batch_size)
        sequences = [[self.tokenizer.bos_id, *ids] for ids in self.tokenizer.encode_batch(texts)]
        for number, ids in enumerate(sequences, 1):
            if len(ids) > self.config.length:
                raise ValueError(f"text {number} takes {len(ids) - 1} tokens + BOS, more than the model's "
                                 f"{self.config.length} positions")
            if len(ids) < 2:
                raise ValueError(f"text {number} is empty")
        return score_sequences(self.model, objective_for(self.model), sequences, passes=passes, seed=seed,
                               batch_size=batch_size, device=self.device, autocast=self.autocast)

    def generative_perplexity(self, evaluator, *, num_samples: int = 64, steps: int | None = None,
                              sampler: str | None = None, batch_size: int = 32, seed: int = 0,
                              cache_refresh: int | str | None = None, cache_growth: float | None = None):
        """Unconditional samples scored by an evaluator (an AR run, hf:NAME, or an `Evaluator`
        already loaded): see `pgm.eval.generative`. `cache_refresh`, `cache_growth`: a PGM's
        encoder cache, as in `generate`."""
        _positive("num_samples", num_samples)
        _positive("batch_size", batch_size)
        sampler = check_text_sampler(self.config.kind, sampler, "random")
        steps = self._steps(steps, self.config.length - 1, sampler)
        network = self._network(cache_refresh, cache_growth)
        scorer = load_evaluator(str(evaluator), device=self.device) if isinstance(evaluator, (str, Path)) else evaluator
        return generative_perplexity(self.model, self.tokenizer, scorer, num_samples=num_samples, steps=steps,
                                     batch_size=batch_size, sampler=sampler, seed=seed, autocast=self.autocast,
                                     **network)


class ImagePipeline(Pipeline):
    """Class-conditional PGM and MaskGIT models of VQ codes: classes, guidance, inpainting."""

    modality = "image"

    @property
    def class_names(self) -> list[str]:
        """The names of the classes, as the training data gave them (none: numbers only)."""
        return self.model.origin.card.get("classes", []) if self.model.origin else []

    @staticmethod
    def _settings(sampler: str | None, guidance: float | None, schedule: str | None) -> tuple[str, float, str]:
        """(sampler, guidance, guidance schedule) with their defaults, checked."""
        sampler = sampler or "halton"
        if sampler not in IMAGE_SAMPLERS:
            raise ValueError(f"an image model samples with {', '.join(IMAGE_SAMPLERS)}, not {sampler!r}")
        guidance = 0.0 if guidance is None else guidance
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
            raise ValueError(f"guidance must be a non-negative number, got {guidance!r}")
        schedule = schedule or "linear"
        if schedule not in ("linear", "constant"):
            raise ValueError(f"guidance_schedule must be linear or constant, got {schedule!r}")
        return sampler, float(guidance), schedule

    def _faithful(self, hide_newest: bool, redraw: bool) -> dict:
        """The options that reproduce the authors' samplers, checked against the model."""
        kind = self.config.kind
        if hide_newest and kind != "pgm":
            raise ValueError(f"hide_newest reproduces the authors' image PGM; {self.name} holds a {kind} model")
        if redraw and kind != "maskgit":
            raise ValueError(f"redraw reproduces the authors' MaskGIT sampler; {self.name} holds a {kind} model")
        return {"hide_newest": hide_newest, "redraw": redraw}

    def _steps(self, steps, unknown: int) -> int:
        steps = _positive("steps", steps, IMAGE_STEPS)
        if steps > unknown:
            raise ValueError(f"steps {steps} is more than the {unknown} cells to generate per image")
        return steps

    def _plan(self, request: GenerationRequest) -> _Plan:
        self._refuse(request, "text")
        config = self.config
        copies = _positive("num_samples", request.num_samples, 1)
        sampler, guidance, schedule = self._settings(request.sampler, request.guidance, request.guidance_schedule)
        options = self._options(request)
        faithful = self._faithful(request.hide_newest, request.redraw)
        network = self._network(request.cache_refresh, request.cache_growth)
        if request.images is not None and request.known is None:
            raise ValueError("images are completed from the region given by known (e.g. known='left')")
        known_codes = known_cells = originals = None
        if request.known is not None:
            labels, known_codes = self._known_images(request)
            known_cells = region_cells(len(known_codes), known_codes.shape[1], request.known)
            originals = self.tokenizer.decode(known_codes)
        else:
            classes = request.classes
            if classes is None:
                if config.num_classes > EVERY_CLASS:
                    raise ValueError(f"{self.name} has {config.num_classes} classes: choose some with classes "
                                     "(--classes 207 360)")
                classes = list(range(config.num_classes))
            labels = parse_classes(classes, self.class_names, config.num_classes)
        rows = [index for index in range(len(labels)) for _ in range(copies)]
        labels = [labels[i] for i in rows]
        if known_codes is not None:
            known_codes, known_cells, originals = known_codes[rows], known_cells[rows], originals[rows]
        cells = self.tokenizer.num_tokens
        steps = self._steps(request.steps, cells - (int(known_cells.sum(1).min()) if known_cells is not None else 0))
        label_tensor = torch.tensor(labels, dtype=torch.long)

        def updates():
            known = {} if known_codes is None else dict(known_codes=known_codes, known_cells=known_cells)
            return iterate_codes(self.model, label_tensor, steps=steps, sampler=sampler, guidance=guidance,
                                 guidance_schedule=schedule, options=options, generator=self._generator(request.seed),
                                 **faithful, **network, **known)

        def finish(codes, seconds):
            codes = codes.cpu()
            images = self.tokenizer.decode(codes)
            known = known_cells if known_cells is not None else torch.zeros_like(codes, dtype=torch.bool)
            return Samples(to_pictures(images), codes, known, steps, seconds, int((~known).sum()),
                           settings={"sampler": sampler, "guidance": guidance, "guidance_schedule": schedule,
                                     "num_samples": copies, **network},
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
            return StepEvent.of(committed, update.step, steps, elapsed, codes=grid.view(-1, side, side).clone())

        def given() -> StepEvent:
            return StepEvent.of(_known_pairs(grid, grid >= 0), -1, steps, 0.0, codes=grid.view(-1, side, side).clone())

        return _Plan(steps, cells, updates, finish, event, given)

    def _known_images(self, request: GenerationRequest) -> tuple[list[int], torch.Tensor]:
        """(labels, codes [N, grid^2]) of the images to complete: the run's first validation images
        with their own labels, or the given images, labelled by `classes` (default: unconditional)."""
        images = request.images
        if isinstance(images, (list, tuple)) and len(images) == 1 and str(images[0]).strip().isdecimal():
            images = int(str(images[0]).strip())  # the command line's `--images N`
        if images is None or (isinstance(images, int) and not isinstance(images, bool)):
            count = VALIDATION_IMAGES if images is None else images
            if request.classes is not None:
                raise ValueError("the run's validation images are completed with their own labels; drop classes")
            data = self.data
            count = _positive("images", count)
            if count > len(data.val):
                raise ValueError(f"the run has {len(data.val)} validation images, fewer than {count}")
            tokens, _ = data.val[list(range(count))]
            return data.val.labels_of(range(count)).tolist(), tokens[:, 1:]
        pictures = list(images) if isinstance(images, (list, tuple)) else [images]
        if not pictures:
            raise ValueError("images is empty: give the images to complete, or a number of validation images")
        codes = torch.as_tensor(self.tokenizer.encode(np.stack([self._pixels(p) for p in pictures]))[:, 1:])
        classes = request.classes if request.classes is not None else ["none"]
        labels = parse_classes(classes, self.class_names, self.config.num_classes)
        if len(labels) not in (1, len(pictures)):
            raise ValueError(f"give one class for all {len(pictures)} images or one for each, not {len(labels)}")
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
                raise ValueError(f"cannot read the image {picture} ({error})") from None
        if isinstance(picture, Image.Image):
            array = np.asarray(picture if picture.mode == mode else picture.convert(mode))
            array = array[None] if channels == 1 else array.transpose(2, 0, 1)
        else:
            array = np.asarray(picture.cpu() if isinstance(picture, torch.Tensor) else picture)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[0] != channels:
                raise ValueError(f"an image array must be uint8 [{channels}, H, W], got {array.dtype} "
                                 f"{list(array.shape)}")
        return fit_size(array[None], size)[0]

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] in [-1, 1] of VQ codes [N, grid^2]."""
        return self.tokenizer.decode(codes)

    def image_quality(self, *, classifier: str | Path = DEFAULT_CLASSIFIER, inception: str | Path | None = None,
                      num_samples: int = 1000, steps: int | None = None, sampler: str | None = None,
                      guidance: float | None = None, guidance_schedule: str | None = None, temperature: float = 1.0,
                      batch_size: int = 32, seed: int = 0, cache_refresh: int | str | None = None,
                      cache_growth: float | None = None) -> dict:
        """FD and IS of `num_samples` generated images (labelled like the run's first validation
        images) against the validation images, beside the VQ tokenizer's floor; see
        `pgm.eval.images.image_quality`. With the metric's name and the settings used."""
        _positive("num_samples", num_samples)
        _positive("batch_size", batch_size)
        sampler, guidance, guidance_schedule = self._settings(sampler, guidance, guidance_schedule)
        SamplingOptions(temperature=temperature)  # checks it
        steps = self._steps(steps, self.tokenizer.num_tokens)
        network = self._network(cache_refresh, cache_growth)
        extractor, metric = load_feature_extractor(classifier=classifier, inception=inception, device=self.device)
        with self.autocast():
            scores = image_quality(self.model, self.tokenizer, self.data, self.run_config.data, extractor,
                                   num_samples=num_samples, steps=steps, sampler=sampler, guidance=guidance,
                                   guidance_schedule=guidance_schedule, seed=seed, batch_size=batch_size,
                                   temperature=temperature, **network)
        return {"metric": metric, "steps": steps, "sampler": sampler, "guidance": guidance,
                "guidance_schedule": guidance_schedule, "temperature": temperature, **network, **scores}

    def fid(self, reference: str | Path, *, inception: str | Path | None = None,
            classifier: str | Path = DEFAULT_CLASSIFIER, num_samples: int = 50_000, steps: int | None = None,
            sampler: str | None = None, guidance: float | None = None, guidance_schedule: str | None = None,
            temperature: float = 1.0, hide_newest: bool = False, redraw: bool = False, batch_size: int = 32,
            shard_size: int = 1000, shards: str | Path | None = None, seed: int = 0, rank: int = 0,
            world_size: int = 1, progress: bool = True) -> dict | None:
        """FID (with `inception`, else the classifier's FD) and IS of `num_samples` generated images
        against a reference: a folder of images (class sub-folders give the labels to sample, as
        the protocol draws the reference set's labels; a flat folder, or statistics, give every
        class in turn) or an `.npz` of statistics (`mu`, `sigma`). Generated in shards kept in
        `shards` (default: fid-shards/KEY beside the model, KEY naming the settings, which
        settings.json records: another evaluation's shards are refused), so that an interruption
        resumes; with several processes (torchrun) each makes its share of the shards and process 0
        returns the result (computing the reference's statistics, kept for the next evaluation
        against it), the others None."""
        _positive("num_samples", num_samples)
        _positive("batch_size", batch_size)
        _positive("shard_size", shard_size)
        sampler, guidance, guidance_schedule = self._settings(sampler, guidance, guidance_schedule)
        options = SamplingOptions(temperature=temperature)
        steps = self._steps(steps, self.tokenizer.num_tokens)
        faithful = self._faithful(hide_newest, redraw)
        extractor, metric = load_feature_extractor(classifier=classifier, inception=inception, device=self.device)
        features_of = str(Path(inception if inception is not None else classifier).resolve())
        settings = {"model": str(Path(self.source).resolve()), "weights": self.model.origin.card.get("weights"),
                    "vq": str(self.tokenizer.source), "precision": self.dtype, "metric": metric,
                    "features": features_of,
                    "steps": steps, "sampler": sampler, "guidance": guidance, "guidance_schedule": guidance_schedule,
                    "temperature": temperature, "seed": seed, "num_samples": num_samples, "batch_size": batch_size,
                    "shard_size": shard_size, "reference": str(Path(reference).resolve()), **faithful,
                    **({"compile": self.compile} if self.compile else {})}  # eager keys stay what they were
        home = (Path(self.name) if Path(self.name).is_dir() else Path(".")) / "fid-shards"
        directory = Path(shards) if shards is not None else home / _key(settings)
        _same_settings(directory, settings)
        given, classes = reference_labels(reference)
        labels = spread_labels(given, num_samples, self.config.num_classes)
        if classes and classes != self.config.num_classes:
            raise ValueError(f"the reference {reference} has {classes} class folders but the model "
                             f"{self.config.num_classes} classes: its labels would not be the model's")

        def make_images(part: list[int], generator: torch.Generator) -> torch.Tensor:
            with self.autocast():
                codes = generate_codes(self.model, torch.tensor(part), steps=steps, sampler=sampler, guidance=guidance,
                                       guidance_schedule=guidance_schedule, options=options, generator=generator,
                                       compile=self.compile, **faithful)
                return self.tokenizer.model.decode_codes(codes).float().clamp(-1, 1)

        found = sharded_features(make_images, extractor, labels, directory=directory, shard_size=shard_size, seed=seed,
                                 batch_size=batch_size, rank=rank, world_size=world_size, progress=progress)
        if found is None:
            return None
        features, logits = found
        # One cache per reference, features and size, shared by every evaluation against it.
        described = {"reference": settings["reference"], "features": features_of, "size": self.tokenizer.image_size}
        cache = home / f"reference-{_key(described)}.npz"
        reference_stats = reference_statistics(reference, extractor, size=self.tokenizer.image_size,
                                               channels=self.tokenizer.channels, cache=cache, progress=progress)
        return {**settings, "fid": frechet_distance(reference_stats, FeatureStatistics.from_features(features)),
                "is": inception_score(logits, min(10, len(logits))), "reference_count": reference_stats.count,
                "shards": str(directory)}


class VQPipeline(Pipeline):
    """A VQ tokenizer's run: evaluated (reconstructions), not sampled."""

    modality = "vq"

    def _plan(self, request):
        raise ValueError(f"{self.name} holds a VQ autoencoder: it reconstructs images; sample from a PGM or "
                         "MaskGIT trained on its codes")

    def save_pretrained(self, directory: str | Path) -> Path:
        """The VQ model with the pixel tokenizer it reads, and its model card."""
        return self.model.save_pretrained(directory)

    def reconstruction(self, *, fid: bool = False, classifier: str | Path = DEFAULT_CLASSIFIER,
                       inception: str | Path | None = None) -> dict:
        """Codebook use and code perplexity on the run's validation images and, with `fid` (or
        `inception`), the FD of their reconstructions; see `pgm.eval.images.reconstruction_quality`."""
        extractor, metric = (None, None)
        if fid or inception is not None:
            extractor, metric = load_feature_extractor(classifier=classifier, inception=inception,
                                                       device=self.device)
        return {"metric": metric, **reconstruction_quality(self.tokenizer, self.run_config.data, extractor)}


def _known_pairs(tokens: torch.Tensor, known: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(position, token) pairs of the known entries of each row."""
    return [[(p, t) for p, (t, k) in enumerate(zip(row, kept)) if k] for row, kept in zip(tokens.tolist(),
                                                                                          known.tolist())]


def _key(settings: dict) -> str:
    """A short name for a set of settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _same_settings(directory: Path, settings: dict) -> None:
    """Record the settings a shard directory is for, and refuse one that holds another evaluation's."""
    recorded = directory / "settings.json"
    if recorded.is_file():
        found = json.loads(recorded.read_text())
        if found != settings:
            changed = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
            raise ValueError(f"{directory} holds the shards of another evaluation (it differs in "
                             f"{', '.join(changed)}): choose other shards, or remove them")
        return
    directory.mkdir(parents=True, exist_ok=True)
    write_json(recorded, settings)


def to_pictures(images: torch.Tensor) -> list:
    """PIL images of float images [N, C, H, W] in [-1, 1]."""
    from PIL import Image

    pixels = to_uint8(images)
    return [Image.fromarray(p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0)) for p in pixels]


def load(source: str | Path, *, device: str | torch.device = "auto", weights: str | None = None,
         precision: Precision = "auto", vq: str | Path | None = None, gpt2_file: str | None = None,
         compile: str | None = None, **import_options) -> Pipeline:
    """The pipeline for `source`: a run directory, a pretrained directory, a released checkpoint
    file or a Hub id, on `device` ("auto": a GPU when there is one) in `precision` ("auto": bf16
    autocast on a GPU, float32 on a CPU). `weights`: "ema" (the average) or "raw"; by default the
    average where the source has one. `vq` overrides an image model's VQ tokenizer (a VQ run or
    pretrained directory, or LlamaGen's file); `gpt2_file` is GPT-2's BPE file for checkpoints that
    name GPT-2's tokenizer (offline). `compile`: a torch.compile mode for the sampling network of
    a PGM, MDLM or MaskGIT (see `pgm.sampling.compiled`); None: eager. `import_options` apply to
    released checkpoint files (see `pgm.importers`)."""
    device = resolve_device(device)
    describe_precision(device, precision)  # checks its name
    check_compile_mode(compile)
    model = from_pretrained(source, weights=weights, **import_options)
    config, origin = model.config, model.origin
    if compile and config.kind not in ("pgm", "mdlm", "maskgit"):
        raise ValueError(f"compile applies to sampling a PGM, MDLM or MaskGIT; {source} holds a {config.kind} model")
    if config.kind == "classifier":
        raise ValueError(f"{source} holds the feature classifier of `pgm eval --fid`, not a generative model")
    if vq is not None and not is_image_model(config):
        raise ValueError(f"vq applies to image models; {source} holds a {config.kind} model")
    if gpt2_file is not None and (is_image_model(config) or origin.tokenizer_dir is not None
                                  or not (origin.tokenizer_name or "").startswith("gpt2")):
        raise ValueError(f"gpt2_file is for checkpoints that name GPT-2's tokenizer without carrying it; {source} "
                         "does not")
    if config.kind == "vq":
        return VQPipeline(model.to(device), VQTokenizer(model, Path(origin.source)), device, precision, str(source))
    if is_image_model(config):
        tokenizer_dir = Path(vq) if vq is not None else origin.tokenizer_dir
        if tokenizer_dir is None:
            raise ValueError(f"{source} names no VQ tokenizer to decode its codes: pass vq=PATH (--vq PATH), a VQ "
                             "directory or LlamaGen's vq_ds8_c2i.pt")
        tokenizer = _checked_vq(model, tokenizer_dir, source)
        tokenizer.model.to(device)
        return ImagePipeline(model.to(device), tokenizer, device, precision, str(source), compile)
    if origin.tokenizer_dir is not None:
        tokenizer = load_tokenizer(origin.tokenizer_dir)
    elif origin.tokenizer_name:
        tokenizer = named_tokenizer(origin.tokenizer_name, gpt2_file)
    else:
        raise ValueError(f"{source} has no tokenizer (no tokenizer/ directory and none named), so its samples "
                         "cannot be turned into text")
    if tokenizer.model_vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer of {source} has {tokenizer.model_vocab_size} ids but the model only "
                         f"{config.vocab_size}")
    return TextPipeline(model.to(device), tokenizer, device, precision, str(source), compile)


def convert(checkpoint: str | Path, out_dir: str | Path, *, weights: str | None = None, gpt2_file: str | None = None,
            vq: str | Path | None = None, vq_reference: bool = False, **import_options) -> tuple[Path, str]:
    """A released checkpoint file written as a pretrained directory (`pgm convert official`): the
    authors' text models with GPT-2's BPE file when one is found offline (else the tokenizer is
    recorded by name and found when loaded), their image models with the VQ tokenizer `vq` (held
    in tokenizer/, or only named there with `vq_reference`), LlamaGen's VQ on its own. Returns the
    directory and what it says of the tokenizer."""
    from .data.corpus import DataError
    from .data.tokenizers import GPT2Tokenizer
    from .runs import CHECKPOINTS

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file():
        raise ValueError(f"{checkpoint} is not a checkpoint file")
    if (out_dir / CHECKPOINTS).exists():
        raise ValueError(f"{out_dir} is a training run; choose another output directory")
    model = from_pretrained(checkpoint, weights=weights, **import_options)
    image = is_image_model(model.config)
    if (vq is not None or vq_reference) and not image:
        raise ValueError(f"vq applies to image models; {checkpoint} holds a {model.config.kind} model")
    if gpt2_file is not None and not (model.origin.tokenizer_name or "").startswith("gpt2"):
        raise ValueError(f"gpt2_file is for checkpoints that name GPT-2's tokenizer; {checkpoint} does not")
    tokenizer = None
    if image and vq is not None:
        tokenizer = _checked_vq(model, vq, checkpoint)
    elif vq_reference:
        raise ValueError("vq_reference names the VQ given as vq; give vq")
    elif (model.origin.tokenizer_name or "").startswith("gpt2"):
        try:
            tokenizer = GPT2Tokenizer(gpt2_file)
        except DataError:
            if gpt2_file:
                raise
    if vq_reference:
        model.save_pretrained(out_dir, keep_tokenizer=False)
        with replaced_directory(out_dir / TOKENIZER_DIR) as temporary:
            tokenizer.save_reference(temporary, Path(vq))
        return out_dir, f"the VQ tokenizer {vq} named in tokenizer/"
    model.save_pretrained(out_dir, tokenizer)
    if tokenizer is not None:
        return out_dir, "its tokenizer in tokenizer/"
    if model.origin.tokenizer_name:
        return out_dir, f"the tokenizer {model.origin.tokenizer_name} named (found when loaded)"
    return out_dir, "no tokenizer" + (" (give --vq to decode its codes)" if image else "")


def _checked_vq(model, vq: str | Path, source) -> VQTokenizer:
    """The VQ tokenizer at `vq`, refused unless its codebook is the one `model` was trained on."""
    tokenizer = load_vq_tokenizer(vq)
    config = model.config
    codes = config.codebook_size if config.kind == "maskgit" else config.mask_token_id
    cells = config.length if config.kind == "maskgit" else config.length - 1  # the PGM's rows start with a BOS
    if (tokenizer.codebook_size, tokenizer.num_tokens) != (codes, cells):
        hint = (f" (an image PGM's length is not in its weights: for this VQ it is {1 + tokenizer.num_tokens}, given "
                "as length or --length)" if config.kind == "pgm" and tokenizer.codebook_size == codes else "")
        raise ValueError(f"the VQ tokenizer {vq} makes {tokenizer.num_tokens} codes of {tokenizer.codebook_size} per "
                         f"image, but the model {source} was trained on {cells} of {codes}{hint}")
    return tokenizer
