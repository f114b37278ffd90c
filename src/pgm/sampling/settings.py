"""Sampler settings: one owner for their names, defaults, help texts, command-line flags and checks.

A request leaves these to the sampler: steps, the sampler (and a PGM's decoding order),
temperature, top-p, float32 draws, guidance and its schedule, the encoder cache, and the two
options that reproduce the authors' image samplers. `SamplerSettings` holds them as given;
`resolve` fills every default and runs every check once, for a model kind and a number of
positions to generate, before any work; what it returns goes down to the sampling loops, which do
not check it again. `add_arguments` puts the fields on an argparse parser, so that `pgm sample`,
`eval`, `report`, `bench` and the server share one set of names, defaults and checks (`report`
and `bench` sweep lists of them).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

from ..errors import SamplingError
from .categorical import SamplingOptions
from .compiled import check_compile_mode

TEXT_STEPS = 128  # a text request's default steps: min(positions to generate, 128)
IMAGE_STEPS = 32
SAMPLERS = {  # a text model kind's samplers, its default first
    "pgm": ("uniform", "binomial", "reference"),
    "mdlm": ("ancestral", "ancestral-nocache", "ancestral-full"),
    "ar": ("kv-cache", "no-cache"),
}
IMAGE_SAMPLERS = ("halton", "confidence")
QUEUED_ORDERS = ("random", "left-to-right")
SCORED_ORDERS = ("confidence", "margin", "entropy")
ORDERS = QUEUED_ORDERS + SCORED_ORDERS
GUIDANCE_SCHEDULES = ("linear", "constant")
NEVER = "never"  # a cache_refresh that keeps the cache to the end


def refresh_interval(text: str) -> int | str:
    """A cache_refresh given as text (a command line's): a number of steps, or "never"."""
    return text if text == NEVER else int(text)


def cache_label(refresh, growth=None) -> str:
    """An encoder-cache setting in a table: "-" (none), the refresh interval, or gF (never by
    count, a refresh whenever the clean set has grown by the fraction F)."""
    if refresh is None:
        return "-"
    return f"g{growth:g}" if growth is not None else str(refresh)


def check_cache_refresh(refresh, growth=None) -> None:
    """Refuse a cache_refresh that is not a positive step count or "never", and a cache_growth
    that is not a positive fraction or comes without a cache."""
    if refresh is not None and refresh != NEVER and (isinstance(refresh, bool) or not isinstance(refresh, int)
                                                     or refresh < 1):
        raise SamplingError(f"cache_refresh must be a positive number of steps or {NEVER!r}, got {refresh!r}")
    if growth is not None:
        if refresh is None:
            raise SamplingError("cache_growth refreshes the encoder cache: give cache_refresh too (e.g. 'never')")
        if not _number(growth) or not growth > 0:
            raise SamplingError(f"cache_growth must be a positive fraction of the clean set, got {growth!r}")


def cache_settings(refreshes=(), growths=()) -> list[tuple]:
    """(cache_refresh, cache_growth) pairs, each checked: one per refresh interval, and one per
    growth fraction that refreshes by growth alone (never by count)."""
    settings = [(refresh, None) for refresh in refreshes] + [(NEVER, growth) for growth in growths]
    for setting in settings:
        check_cache_refresh(*setting)
    return settings


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


# Far past any useful value, and far below where the scaled logits leave the floats' range (a
# temperature or a guidance of 1e308 drew ids outside the vocabulary).
LARGEST = {"temperature": 100.0, "guidance": 100.0}


def _setting(default, help: str, modality: str | None = None, sweep: bool = False, **cli):
    """A field with its help text, the modality it applies to (None: both), whether `report` and
    `bench` take a list of it, and its argparse keywords."""
    return dataclasses.field(default=default, metadata={"help": help, "modality": modality, "sweep": sweep,
                                                         "cli": cli})


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How to sample, as given (None: the default, said in the help); `resolve` checks them and
    fills in the defaults."""

    steps: int | None = _setting(
        None, f"decoding steps (default: text min(positions, {TEXT_STEPS}), images {IMAGE_STEPS}; an "
              "autoregressive model takes one per token)", sweep=True, type=int)
    sampler: str | None = _setting(
        None, "pgm: uniform (default), binomial, reference; mdlm: ancestral, ancestral-nocache, ancestral-full "
              "(logits at every position, as the paper's MDLM); ar: kv-cache, no-cache; images: halton (default), "
              "confidence")
    order: str | None = _setting(None, "PGM decoding order: random (default), left-to-right, confidence, margin, "
                                       "entropy", "text")
    temperature: float = _setting(1.0, "sampling temperature (0: greedy)", type=float)
    top_p: float = _setting(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability",
                            type=float)
    top_k: int = _setting(0, "keep only the k most likely tokens at each draw (0: every token)", type=int)
    float32: bool = _setting(False, "draw from a float32 instead of a float64 cumulative distribution",
                             action="store_true")
    guidance: float | None = _setting(None, "classifier-free guidance weight w (default 0)", "image", type=float)
    guidance_schedule: str | None = _setting(None, "ramp w up from 0 over the steps (linear, the default, as the "
                                                   "authors) or keep it (constant)", "image",
                                             choices=GUIDANCE_SCHEDULES)
    hide_newest: bool = _setting(False, "image PGM: hide the newest clean token at every step, as the authors' "
                                        "released image PGM does (an off-by-one their FIDs were measured with)",
                                 "image", action="store_true")
    redraw: bool = _setting(False, "MaskGIT: draw every decoded cell again at each step, as the PGM paper's MaskGIT "
                                   "baseline did (upstream Halton-MaskGIT, the default, draws only the new cells)",
                            "image", action="store_true")
    cache_refresh: int | str | None = _setting(
        None, "PGM: keep each clean token's encoder states between steps (faster, approximate) and re-encode the "
              f"whole clean set every N steps, or {NEVER!r}; 1 is exact sampling (default: no cache)", sweep=True,
        type=refresh_interval, metavar="N")
    cache_growth: float | None = _setting(
        None, "with cache_refresh: also re-encode when the clean set has grown by this fraction since the last full "
              "encoding (e.g. 0.5)", sweep=True, type=float, metavar="F")
    # What `resolve` was given: the model kind and modality the settings are resolved for ("" until then).
    resolved_for: tuple = dataclasses.field(default=(), repr=False, compare=False)

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        """The settings a user gives (not the resolution's own record)."""
        return [field for field in dataclasses.fields(cls) if field.name != "resolved_for"]

    @classmethod
    def names(cls) -> set[str]:
        return {field.name for field in cls.fields()}

    def given(self, modality: str) -> list[str]:
        """The settings of one modality that differ from their defaults."""
        return [field.name for field in self.fields() if field.metadata["modality"] == modality
                and _differs(getattr(self, field.name), field.default)]

    def resolve(self, kind: str, modality: str, *, unknown: int, compile: str | None = None,
                holder: str = "") -> "SamplerSettings":
        """The settings for sampling a `kind` model ("pgm", "mdlm", "ar", "maskgit") of `modality`
        ("text" or "image") with `unknown` positions (or cells) to generate per row, loaded with
        `compile`: every default filled in, every check run (once: settings already resolved for
        the same model come back as they are). `holder` names the model in the messages."""
        if self.resolved_for:
            if self.resolved_for != (kind, modality):
                raise SamplingError(f"these settings were resolved for a {self.resolved_for[0]} model, not a {kind}")
            return self
        holder = f"{holder} holds" if holder else "this is"
        self._check_types()
        other = "image" if modality == "text" else "text"
        given = self.given(other)
        if given:
            article = "an" if modality == "image" else "a"
            raise SamplingError(f"{given[0]} applies to {other} models; {holder} {article} {modality} {kind} model")
        check_compile_mode(compile)
        self.options  # the temperature and top-p, checked by SamplingOptions
        values = self._resolve_text(kind, unknown) if modality == "text" else self._resolve_image(kind, unknown)
        self._check_cache(kind, values["sampler"], compile, holder)
        return dataclasses.replace(self, **values, resolved_for=(kind, modality))

    def _check_types(self) -> None:
        """What a server passes is what a client sent: every value of the type its field wants."""
        for name in ("temperature", "top_p", "guidance"):
            value = getattr(self, name)
            if (value is not None or name != "guidance") and not _number(value):  # guidance: None is the default
                raise SamplingError(f"{name} must be a finite number, got {value!r}")
            if value is not None and value > LARGEST.get(name, math.inf):
                raise SamplingError(f"{name} must be at most {LARGEST[name]:g} (beyond, the scaled logits overflow), "
                                    f"got {value!r}")
        for name in ("float32", "hide_newest", "redraw"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("sampler", "order", "guidance_schedule"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise SamplingError(f"{name} must be a string, got {value!r}")
        check_cache_refresh(self.cache_refresh, self.cache_growth)

    def _resolve_text(self, kind: str, unknown: int) -> dict:
        if kind not in SAMPLERS:
            raise SamplingError(f"a {kind} model does not generate text")
        sampler = self.sampler or SAMPLERS[kind][0]
        if sampler not in SAMPLERS[kind]:
            raise SamplingError(f"a {kind} model samples with {', '.join(SAMPLERS[kind])}, not {sampler!r}")
        order = self.order or "random"
        if order not in ORDERS:
            raise SamplingError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        if order != "random" and kind != "pgm":
            raise SamplingError(f"decoding orders other than random are for PGM models, not {kind}")
        if kind == "ar":
            if self.steps is not None:
                raise SamplingError("an autoregressive model decodes one token per step; steps does not apply to it")
            return {"sampler": sampler, "order": order, "steps": unknown}
        steps = _positive_steps(self.steps, min(unknown, TEXT_STEPS))
        if kind == "pgm" and sampler != "binomial" and steps > unknown:
            raise SamplingError(f"steps {steps} is more than the {unknown} positions to generate: a PGM decodes at "
                                "least one position per step (the binomial sampler may take more steps)")
        return {"sampler": sampler, "order": order, "steps": steps}

    def _resolve_image(self, kind: str, unknown: int) -> dict:
        sampler = self.sampler or IMAGE_SAMPLERS[0]
        if sampler not in IMAGE_SAMPLERS:
            raise SamplingError(f"an image model samples with {', '.join(IMAGE_SAMPLERS)}, not {sampler!r}")
        guidance = 0.0 if self.guidance is None else float(self.guidance)
        if guidance < 0:
            raise SamplingError(f"guidance must be a non-negative number, got {self.guidance!r}")
        schedule = self.guidance_schedule or GUIDANCE_SCHEDULES[0]
        if schedule not in GUIDANCE_SCHEDULES:
            raise SamplingError(f"guidance_schedule must be linear or constant, got {schedule!r}")
        if self.hide_newest and kind != "pgm":
            raise SamplingError(f"hide_newest reproduces the authors' image PGM; this is a {kind} model")
        if self.redraw and kind != "maskgit":
            raise SamplingError(f"redraw reproduces the authors' MaskGIT sampler; this is a {kind} model")
        steps = _positive_steps(self.steps, IMAGE_STEPS)
        if steps > unknown:
            raise SamplingError(f"steps {steps} is more than the {unknown} cells to generate per image")
        return {"sampler": sampler, "guidance": guidance, "guidance_schedule": schedule, "steps": steps}

    def _check_cache(self, kind: str, sampler: str, compile: str | None, holder: str) -> None:
        if self.cache_refresh is None:
            if sampler == "reference" and compile:
                raise SamplingError("the reference sampler is the slow check of the efficient one and is not "
                                    f"compiled; compile={compile!r} was given")
            return
        if kind != "pgm":
            raise SamplingError(f"the encoder cache (cache_refresh) is for PGM models; {holder} a {kind} model")
        if compile:
            raise SamplingError(f"the encoder cache (cache_refresh) is not compiled; compile={compile!r} was given")
        if sampler == "reference":
            raise SamplingError("the reference sampler runs the training view, which has no encoder cache")

    @property
    def options(self) -> SamplingOptions:
        """How each token is drawn (temperature, top-p, float64)."""
        return SamplingOptions(temperature=float(self.temperature), top_p=float(self.top_p), float64=not self.float32,
                               top_k=self.top_k)

    @property
    def cache(self) -> dict:
        """The encoder-cache arguments of the PGM loop."""
        return {"cache_refresh": self.cache_refresh, "cache_growth": self.cache_growth}

    def summary(self) -> dict:
        """What a resolved request's samples report of how they were drawn."""
        kind, modality = self.resolved_for or ("", "")
        chosen = ("sampler", "order") if modality == "text" else ("sampler", "guidance", "guidance_schedule")
        return {**{name: getattr(self, name) for name in chosen}, **self.cache}

    @classmethod
    def split(cls, arguments: dict) -> tuple[dict, "SamplerSettings"]:
        """(the arguments that are not settings, the settings among them)."""
        names = cls.names()
        return ({k: v for k, v in arguments.items() if k not in names},
                cls(**{k: v for k, v in arguments.items() if k in names}))


def _differs(value, default) -> bool:
    return value is not None if default is None else value is not default and value != default


def _positive_steps(steps, default: int) -> int:
    steps = default if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SamplingError(f"steps must be a positive integer, got {steps!r}")
    return steps


def add_arguments(parser: argparse.ArgumentParser, names=None, *, sweep: bool = False,
                  notes: dict[str, str] | None = None) -> None:
    """Flags for the settings `names` (default: all): `--cache-refresh` for cache_refresh, their
    help and types from the fields; a flag not given leaves the attribute unset (the setting's
    default). `sweep`: the sweepable ones take a list (`report`, `bench`); `notes`: what a
    command adds to a flag's help (its own defaults, what a list means there)."""
    for field in SamplerSettings.fields():
        if names is not None and field.name not in names:
            continue
        cli = dict(field.metadata["cli"])
        if sweep and field.metadata["sweep"]:
            cli["nargs"] = "+"
        note = (notes or {}).get(field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=argparse.SUPPRESS,
                            help=field.metadata["help"] + (f"; here: {note}" if note else ""), **cli)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on a command line (as `add_arguments` made their flags)."""
    return {name: getattr(args, name) for name in SamplerSettings.names() if hasattr(args, name)}
