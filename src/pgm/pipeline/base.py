"""The pipeline every model kind shares: the model with its tokenizer, device and precision;
requests checked once and turned into a sampling plan, run to the end or step by step; the
validation ELBO of the run the model came from."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..data import data_directory, load_prepared
from ..devices import Precision, autocast, describe_precision, synchronize
from ..errors import ArgumentError
from ..eval import validation_elbo
from ..eval.perplexity import seed_for
from ..objectives import objective_for
from ..runs import read_run_config
from ..sampling import StepUpdate, run_to_end
from ..sampling.settings import SamplerSettings
from .request import GenerationRequest, Samples, StepEvent, Stream, positive

# GPT-2's longest token has 128 bytes and a character at least one, so a text of more characters than
# this per position of the model takes more tokens than it has positions (with any tokenizer we ship).
CHARACTERS_PER_POSITION = 128
SAMPLE_CHUNK = 512  # rows drawn at a time by `chunks` and `generate`: any request in bounded memory


@dataclasses.dataclass
class SamplingPlan:
    """A checked request, ready to run: `updates()` starts its sampling loop, `finish` turns the
    loop's result into `Samples`, `event` one of its updates into a `StepEvent`, `given()` is the
    event of the known tokens; `steps` and `length` (the positions of a row) as resolved."""

    steps: int
    length: int
    updates: Callable[[], Iterator[StepUpdate]]
    finish: Callable[[torch.Tensor, float], Samples]
    event: Callable[[StepUpdate, float], StepEvent]
    given: Callable[[], StepEvent]


def _joined(parts: list[Samples]) -> Samples:
    """Image chunks, each a few copies of every class or image (unit by unit), as the one `Samples`
    of the whole request: every unit's rows together, in its order."""
    units = len(parts[0].outputs) // parts[0].settings["num_samples"]
    order, offset = [[] for _ in range(units)], 0
    for part in parts:
        each = len(part.outputs) // units
        for unit in range(units):
            order[unit] += range(offset + unit * each, offset + (unit + 1) * each)
        offset += len(part.outputs)
    rows = [row for unit in order for row in unit]

    def joined(name):
        values = [getattr(part, name) for part in parts]
        if values[0] is None:
            return None
        if isinstance(values[0], torch.Tensor):
            return torch.cat(values)[rows]
        every = [item for value in values for item in value]
        return [every[row] for row in rows]

    first = parts[0]
    return Samples(joined("outputs"), joined("tokens"), joined("known"), first.steps,
                   sum(part.seconds for part in parts), sum(part.generated for part in parts),
                   settings={**first.settings, "num_samples": offset // units}, labels=joined("labels"),
                   images=joined("images"), originals=joined("originals"))


class Pipeline:
    """A model, its tokenizer, the device and the precision (see `pgm.pipeline`).

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
        """Texts (text models) or PIL images (image models) for a request, in its order; see
        `GenerationRequest` and `SamplerSettings` for the arguments. A request of more than
        SAMPLE_CHUNK rows is drawn a chunk at a time (`chunks`), so only its outputs add up."""
        if self.modality == "text":
            return [output for part in self.chunks(**arguments) for output in part.outputs]
        return self.sample(**arguments).outputs

    def sample(self, **arguments) -> Samples:
        """`generate`, with the tokens and the timing. Text is drawn as one batch (its rows may differ
        in length from template to template: `chunks` bounds a large request); images a chunk at a
        time, put back in the request's order."""
        if self.modality == "text":
            return self._drawn(arguments)
        parts = list(self.chunks(**arguments))
        return parts[0] if len(parts) == 1 else _joined(parts)

    def chunks(self, chunk_rows: int | None = None, **arguments) -> Iterator[Samples]:
        """The samples of a request, at most `chunk_rows` (default SAMPLE_CHUNK) rows at a time, each
        drawn when the last is taken, so that a request of any size runs in the memory of one chunk.
        Text: each prompt or template in turn, its copies in chunks (the request's order); images: a
        few copies of every class or image per chunk. The first chunk draws with the request's seed,
        so a request of one chunk is drawn as it always was; the others with seeds derived from it."""
        request = GenerationRequest.from_arguments(dict(arguments))
        chunk_rows = positive("chunk_rows", chunk_rows, SAMPLE_CHUNK)
        total = self.rows(request)
        if total <= chunk_rows:
            yield self._drawn(arguments)
            return
        copies = positive("num_samples", request.num_samples, 1)
        for number, part in enumerate(self._chunked(arguments, copies, total // copies, chunk_rows)):
            yield self._drawn({**part, "seed": request.seed if number == 0 else seed_for(request.seed, number)})

    def _chunked(self, arguments: dict, copies: int, units: int, chunk_rows: int) -> Iterator[dict]:
        """The arguments of each chunk of a request of `copies` x `units` rows (see `chunks`)."""
        if self.modality != "text":
            per_chunk = max(1, chunk_rows // units)
            for start in range(0, copies, per_chunk):
                yield {**arguments, "num_samples": min(per_chunk, copies - start)}
            return
        given = [(name, text) for name in ("prompt", "infill") if arguments.get(name) is not None
                 for text in ([arguments[name]] if isinstance(arguments[name], str) else arguments[name])]
        for name, text in given or [(None, None)]:
            for start in range(0, copies, chunk_rows):
                part = {**arguments, "num_samples": min(chunk_rows, copies - start)}
                if name is not None:
                    part[name] = text
                yield part

    def _drawn(self, arguments: dict) -> Samples:
        """A request drawn as one batch."""
        plan = self.plan(GenerationRequest.from_arguments(arguments))
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
        plan = self.plan(GenerationRequest.from_arguments(arguments))
        return Stream(plan.given(), plan.length, self._events(plan))

    def _events(self, plan: SamplingPlan) -> Iterator[StepEvent]:
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

    def plan(self, request: GenerationRequest) -> SamplingPlan:
        """A request checked (every argument, once) and turned into a `SamplingPlan`."""
        raise ArgumentError(f"{self.name} holds a {self.config.kind} model, which does not generate")

    def checked(self, request: GenerationRequest) -> None:
        """Refuse the inputs of the other modality and arguments of the wrong type."""
        other = "image" if self.modality == "text" else "text"
        given = request.given(other)
        if given:
            article = "an" if self.modality == "image" else "a"
            raise ArgumentError(f"{given[0]} applies to {other} models; {self.name} holds {article} {self.modality} "
                                f"{self.config.kind} model")
        request.check_types()
        # A text that cannot fit is refused by its size before the tokenizer spends seconds on megabytes.
        limit = self.config.length * CHARACTERS_PER_POSITION
        for name in ("prompt", "infill"):
            value = getattr(request, name)
            for number, text in enumerate([value] if isinstance(value, str) else
                                          value if isinstance(value, (list, tuple)) else [], 1):
                if isinstance(text, str) and len(text) > limit:
                    raise ArgumentError(f"{name} {number} has {len(text)} characters, more than the model's "
                                        f"{self.config.length} positions can hold (at most {limit})")

    def rows(self, request: GenerationRequest) -> int:
        """The samples `request` asks for, before any of its work (see `GenerationRequest.rows`)."""
        return request.rows(self.config.num_classes if self.modality == "image" else 0)

    def resolved(self, settings: SamplerSettings, unknown: int) -> SamplerSettings:
        """Sampler settings checked for this model and `unknown` positions to generate, defaults filled."""
        return settings.resolve(self.config.kind, self.modality, unknown=unknown, compile=self.compile,
                                holder=self.name)

    def generator(self, seed: int) -> torch.Generator:
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
            raise ArgumentError(f"{self.name} is not a training run, so it has no validation data to evaluate on")
        return self.run

    def validation(self, *, passes: int | None = None, rows: int = 0, batch_size: int = 32, seed: int = 0):
        """The validation ELBO of the run's validation rows (the first `rows`, 0: all) over `passes`
        Monte-Carlo passes (default 4; an autoregressive model and a VQ are exact in one)."""
        exact = self.config.kind in ("ar", "vq")
        if exact and passes not in (None, 1):
            what = "an autoregressive" if self.config.kind == "ar" else "a VQ"
            raise ArgumentError(f"passes applies to a Monte-Carlo ELBO; {self.name} holds {what} model, whose "
                                "validation is exact in one pass: leave passes out")
        passes = positive("passes", passes, default=1 if exact else 4)
        positive("batch_size", batch_size)
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ArgumentError(f"rows must be a non-negative integer (0: all), got {rows!r}")
        data = self.data
        if rows > len(data.val):
            raise ArgumentError(f"rows={rows} is more than the {len(data.val)} validation rows of {self.name}: leave "
                                "it out (0) to score them all")
        indices = range(rows) if rows else None
        return validation_elbo(self.model, objective_for(self.model), data.val, indices=indices,
                               batch_size=batch_size, passes=passes, seed=seed, device=self.device,
                               autocast=self.autocast,
                               bos_always_clean=self.run_config.train.bos_always_clean)

    def save_pretrained(self, directory: str | Path) -> Path:
        """The model with its tokenizer and model card, as a pretrained directory."""
        return self.model.save_pretrained(directory, self.tokenizer)
