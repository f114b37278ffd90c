"""What only a GPU runs, checked beside the timings of benchmarks/gpu_paper_protocol.sh (issue 32,
class 11): sampling compiled with CUDA graphs ("reduce-overhead": inductor plus CUDA graphs) and
bf16 autocast on a GPU. The CPU tests cover compile mode "default" in float32 and CPU autocast;
nothing there records a CUDA graph or runs CUDA's autocast.

Each check is named, passes or fails, and records what it measured and the tolerance it was held
to (small random-weight models, built as the tests build theirs, fixed seeds):

  tokens/SAMPLER/PRECISION   compiled sampling (twice: the first run compiles and records the CUDA
                             graphs, the second replays them) against eager, the same seed: PGM
                             (random order, ragged prompts, confidence order), MDLM, image PGM and
                             MaskGIT with guidance. A rounding may flip a draw that lies at a near-tie,
                             and its row diverges from there: in float32 most rows identical
                             (FP32_IDENTICAL_ROWS), in bf16 a share of equal tokens well above chance
                             (BF16_TOKEN_FLOOR).
  logits/MODEL/PRECISION     one compiled network call against the eager call on the same inputs
                             (the PGM's through its bucket padding): max |difference| / max |eager|.
  replay/MODEL/PRECISION     one CUDA graph replayed with different inputs of the same buckets
                             (A, B, A, B, A): every output its own input's (eager's, as above) and A's
                             and B's apart. The stale-output bug (a graph's output memory is rewritten
                             by its next replay) would hand B's logits back as A's, or the reverse.
  cudagraphs/MODEL/PRECISION inductor recorded CUDA graphs for the model (no "skipping cudagraphs"):
                             without them "reduce-overhead" in the timings is inductor alone.
  cache/pgm                  the encoder cache, compiled: skipped while the settings refuse compile
                             with cache_refresh (its loop runs eagerly).
  memory/SAMPLER/PRECISION   peak GPU memory (torch.cuda.max_memory_allocated) of each sampled
                             configuration, eager and compiled: recorded, not judged.
  training/PRESET            two training steps of each model kind with train.precision=bf16 on the
                             device against float32 (tests/test_bf16.py's check, on CUDA's autocast).

    python benchmarks/gpu_correctness.py --device cuda --out docs/bench-gpu/correctness.json
    python benchmarks/gpu_correctness.py --device cpu --quick --out /tmp/correctness.json   # dry run

On a CPU, compile mode "default" stands in for "reduce-overhead" (the same checks, no CUDA
graphs), and the checks that need CUDA (cudagraphs, memory) are skipped. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters

from pgm.devices import autocast, resolve_device, synchronize
from pgm.errors import DataError, SamplingError
from pgm.models import MaskedDiffusionConfig, MaskGITConfig, PartitionConfig, build_model
from pgm.sampling import sample_mdlm, sample_pgm
from pgm.sampling.codes import generate_codes
from pgm.sampling.compiled import COMPILE_MODES, SMALLEST_BUCKET, bucket, compiled_call, compiled_predict
from pgm.sampling.settings import SamplerSettings

# Tolerances. bf16 keeps 8 significant bits: one rounding is off by up to 2^-9 (0.2%). A network
# call's logits gather many roundings, mostly cancelling: tests/test_bf16.py measured bf16 autocast
# 0.6-0.7% of the largest logit away from float32 and holds it to 2%. Compiling changes which
# roundings happen (inductor fuses ops and computes their insides in float32), so compiled bf16 is
# held to the same 2% from float32, and to twice that from eager bf16, whose own 2% may lie the
# other way (measured on a CPU: 0.7% and 1.2% for the toy PGM).
BF16_LOGITS = 0.02
# Float32: compiled and eager differ by summation order alone (1e-6 of the largest logit measured).
FP32_LOGITS = 1e-4
# Those 1e-6 still move the categorical's cumulative boundaries by about 1e-7, and a draw whose
# uniform lies that close to one flips: at vocabulary 512, 16 rows of 255 tokens, compiled float32
# sampling (mode default, on a CPU) diverged from eager in one or two rows of 4 samplers in 6; the
# divergence examined (MDLM's) began at such a near-tie, the uniform 1e-6 from a boundary. A
# broken compiled loop (a wrong padding mask, a stale output) breaks every row that passes the
# step, so float32 asks for most rows identical rather than every token.
FP32_IDENTICAL_ROWS = 0.5
# A flipped bf16 draw changes what every later step of its row conditions on, so the rows diverge
# from there: eager bf16 against eager float32 agreed on 76-100% of the toy models' tokens on a CPU,
# varying with the model and the seed. No fixed share fits every model, so the floor is measured in
# the same run, a quarter of the way from chance (eager bf16 against itself with another seed) to
# bf16's own agreement (eager bf16 against eager float32). It catches a broken compiled loop, which
# falls to chance, and not less: a row that diverges early moves the share by a lot (measured on a
# CPU: 0.71 against an own 0.86 and a chance of 0.51), and the bf16 logits checks hold the tolerance.
BF16_TOKEN_FLOOR = 0.25  # the fraction of the way from chance to bf16's own agreement
# tests/test_bf16.py: two training steps in bf16 within 1% (loss) and 2% (gradient norm) of float32.
TRAINING_LOSS, TRAINING_GRAD_NORM = 0.01, 0.02
GUIDANCE = 2.0  # image samplers: guidance doubles the batch (the conditional and the null rows)


@dataclasses.dataclass
class Shapes:
    """The models and sampling runs: toy sizes for --quick, small but not trivial on a GPU."""

    batch: int
    text_vocab: int
    text_length: int
    hidden: int
    heads: int
    text_steps: int
    codebook: int
    grid: int
    classes: int
    image_steps: int


# Grid 6: the image PGM's 37 positions hold the network checks' clean sets and queries (up to 27 + 9).
QUICK = Shapes(batch=3, text_vocab=41, text_length=40, hidden=32, heads=4, text_steps=8, codebook=12, grid=6,
               classes=3, image_steps=5)
# Length 256 in 32 steps: the PGM's clean set runs through 12 buckets (16 to 256), each a CUDA graph.
# 16 rows: the token shares of a bf16 run move by whole diverging rows.
FULL = Shapes(batch=16, text_vocab=512, text_length=256, hidden=128, heads=4, text_steps=32, codebook=64, grid=8,
              classes=10, image_steps=16)


@dataclasses.dataclass
class Check:
    name: str
    status: str  # "pass", "fail", "recorded" (measured, not judged) or "skipped: why"
    tolerance: str
    measured: dict = dataclasses.field(default_factory=dict)
    summary: str = ""  # the measured numbers that matter, for the table
    seconds: float = 0.0


class Skip(Exception):
    """A check that cannot run here; its message says why."""


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference|: tests/test_bf16.py's measure for logits."""
    value, reference = value.float(), reference.float()
    return float((value - reference).abs().max() / reference.abs().max().clamp(min=1e-30))


def equal_share(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """The share of the positions `where` at which two samples hold the same token."""
    return float((a == b)[where].float().mean())


def identical_rows(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """The share of rows whose tokens at the positions `where` are all the same in both samples."""
    return float(((a == b) | ~where).all(dim=1).float().mean())


def redraw_zeros(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Zero-initialised layers (adaLN modulations, output layers) would make every logit equal and
    every comparison pass trivially: redraw them, as tests/conftest.py does."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def build_models(shapes: Shapes, device: torch.device) -> dict[str, torch.nn.Module]:
    text = {"vocab_size": shapes.text_vocab, "length": shapes.text_length, "hidden_size": shapes.hidden,
            "num_heads": shapes.heads, "cond_dim": shapes.hidden // 2, "dropout": 0.0}
    configs = {
        "pgm": PartitionConfig(encoder_blocks=2, decoder_blocks=2, **text),
        "mdlm": MaskedDiffusionConfig(blocks=3, **text),
        "image-pgm": PartitionConfig(vocab_size=shapes.codebook + 2, length=1 + shapes.grid ** 2,
                                     mask_token_id=shapes.codebook, hidden_size=shapes.hidden, num_heads=shapes.heads,
                                     encoder_blocks=2, decoder_blocks=2, cond_dim=shapes.hidden, dropout=0.0,
                                     num_classes=shapes.classes, registers=2),
        "maskgit": MaskGITConfig(codebook_size=shapes.codebook, grid_size=shapes.grid, hidden_size=shapes.hidden,
                                 depth=2, num_heads=shapes.heads, mlp_dim=2 * shapes.hidden,
                                 num_classes=shapes.classes, registers=1, dropout=0.0),
    }
    models = {}
    for index, (name, config) in enumerate(configs.items()):
        torch.manual_seed(index)
        models[name] = redraw_zeros(build_model(config), seed=index).eval().to(device)
    return models


# ---------------------------------------------------------------------------------------------
# Whole sampling runs: compiled against eager
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Sampler:
    """One sampled configuration: which model, how it is sampled, and which positions it generates."""

    name: str
    model: str
    run: Callable[[torch.nn.Module, str | None, torch.Generator], torch.Tensor]  # (model, compile mode, generator)
    generated: torch.Tensor  # [B, L] bool: the positions compared


def text_prompts(shapes: Shapes, device, ragged: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A BOS at position 0 of every row (as `pgm bench sampling`), or prompts of different lengths
    per row, so that the compiled PGM call masks padded clean slots through `lengths`."""
    rows, length = shapes.batch, shapes.text_length
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, shapes.text_vocab - 1, (rows, length), generator=generator)  # the mask is the last id
    sizes = [1 + (7 * row) % (length // 2) for row in range(rows)] if ragged else [1] * rows
    known = torch.arange(length)[None] < torch.tensor(sizes)[:, None]
    return torch.where(known, tokens, 0).to(device), known.to(device)


def samplers(shapes: Shapes, device) -> list[Sampler]:
    steps, image_steps = shapes.text_steps, shapes.image_steps
    bos, bos_known = text_prompts(shapes, device, ragged=False)
    prompts, prompted = text_prompts(shapes, device, ragged=True)
    # Every class and the null class (an unconditional row), repeated to the batch.
    labels = torch.arange(shapes.batch, device=device) % (shapes.classes + 1)
    cells = torch.ones(shapes.batch, shapes.grid ** 2, dtype=torch.bool, device=device)
    image_settings = SamplerSettings(steps=image_steps, guidance=GUIDANCE)

    def pgm(known_tokens, known_mask, **options):
        return lambda model, mode, generator: sample_pgm(model, known_tokens=known_tokens, known_mask=known_mask,
                                                         steps=steps, compile=mode, generator=generator, **options)

    def codes(model, mode, generator):
        return generate_codes(model, labels, settings=image_settings, compile=mode, generator=generator)

    return [
        Sampler("pgm", "pgm", pgm(bos, bos_known), ~bos_known),
        Sampler("pgm-prompts", "pgm", pgm(prompts, prompted), ~prompted),
        Sampler("pgm-confidence", "pgm", pgm(bos, bos_known, order="confidence"), ~bos_known),
        Sampler("mdlm", "mdlm", lambda model, mode, generator: sample_mdlm(
            model, known_tokens=bos, known_mask=bos_known, steps=steps, compile=mode, generator=generator),
            ~bos_known),
        Sampler("image-pgm", "image-pgm", codes, cells),
        Sampler("maskgit", "maskgit", codes, cells),
    ]


class SkipReasons(logging.Handler):
    """Inductor's reasons for not recording a CUDA graph ("skipping cudagraphs due to ..."), which
    it logs as warnings under torch._inductor."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "cudagraph" in message.lower() and message not in self.reasons:
            self.reasons.append(message)


class Session:
    """The device, the compile mode, the models, and what earlier checks left for later ones."""

    def __init__(self, device: torch.device, mode: str, shapes: Shapes):
        self.device, self.mode, self.shapes = device, mode, shapes
        self.models = build_models(shapes, device)
        self.eager_tokens: dict[tuple[str, str], torch.Tensor] = {}  # (sampler, precision) -> tokens
        self.cudagraph_skips: dict[tuple[str, str], int] = {}  # (model, precision) -> skips counted
        self.skip_reasons = SkipReasons()
        logging.getLogger("torch._inductor").addHandler(self.skip_reasons)

    @property
    def records_cuda_graphs(self) -> bool:
        return self.device.type == "cuda" and self.mode in ("reduce-overhead", "max-autotune")

    def sample(self, sampler: Sampler, mode: str | None, precision: str,
               seed: int = 0) -> tuple[torch.Tensor, float, float | None]:
        """(tokens, seconds, peak MiB) of one run."""
        model = self.models[sampler.model]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        synchronize(self.device)
        started = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        skips = counters["inductor"]["cudagraph_skips"]
        with autocast(self.device, precision):
            tokens = sampler.run(model, mode, generator)
        synchronize(self.device)
        seconds = time.perf_counter() - started
        self.count_skips(sampler.model, precision, skips)
        peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 20 if self.device.type == "cuda" else None
        return tokens, seconds, peak

    def count_skips(self, model: str, precision: str, before: int) -> None:
        key = (model, precision)
        self.cudagraph_skips[key] = self.cudagraph_skips.get(key, 0) + counters["inductor"]["cudagraph_skips"] - before


def check_tokens(session: Session, sampler: Sampler, precision: str) -> list[Check]:
    """The tokens check of one sampler, and its peak-memory record."""
    mode = session.mode
    eager, eager_s, eager_mb = session.sample(sampler, None, precision)
    session.eager_tokens[sampler.name, precision] = eager
    first, first_s, first_mb = session.sample(sampler, mode, precision)  # compiles; records the CUDA graphs
    replayed, replay_s, replay_mb = session.sample(sampler, mode, precision)  # replays them
    where = sampler.generated
    measured = {"mode": mode, "precision": precision, "generated_tokens": int(where.sum()),
                "equal_share_first_compiled_run": equal_share(first, eager, where),
                "equal_share_second_compiled_run": equal_share(replayed, eager, where),
                "equal_share_second_vs_first_compiled_run": equal_share(replayed, first, where),
                "identical_rows_first_compiled_run": identical_rows(first, eager, where),
                "identical_rows_second_compiled_run": identical_rows(replayed, eager, where),
                "seconds": {"eager": eager_s, "compiled_first": first_s, "compiled_second": replay_s}}
    shares = [measured["equal_share_first_compiled_run"], measured["equal_share_second_compiled_run"]]
    summary = f"equal {shares[0]:.3f}/{shares[1]:.3f} of {int(where.sum())}"
    if precision == "fp32":
        rows = [measured["identical_rows_first_compiled_run"], measured["identical_rows_second_compiled_run"]]
        tolerance = (f"share of rows identical to eager's >= {FP32_IDENTICAL_ROWS} in both compiled runs "
                     "(a near-tie draw may flip a row)")
        passed = min(rows) >= FP32_IDENTICAL_ROWS
        summary += f", rows {rows[0]:.2f}/{rows[1]:.2f}"
    else:
        float32 = session.eager_tokens.get((sampler.name, "fp32"))
        if float32 is None:
            float32 = session.sample(sampler, None, "fp32")[0]
        own = equal_share(eager, float32, where)
        chance = equal_share(eager, session.sample(sampler, None, precision, seed=1)[0], where)
        floor = chance + BF16_TOKEN_FLOOR * (own - chance)
        measured.update(equal_share_eager_bf16_vs_eager_fp32=own, equal_share_eager_bf16_other_seed=chance,
                        floor=floor)
        tolerance = (f"share of generated tokens equal to eager's >= chance + {BF16_TOKEN_FLOOR} (bf16's own share "
                     "- chance), in both compiled runs (own: eager bf16 vs fp32; chance: another seed)")
        passed = min(shares) >= floor
        summary += f" >= {floor:.3f} (own {own:.3f}, chance {chance:.3f})"
    tokens = Check(f"tokens/{sampler.name}/{precision}", "pass" if passed else "fail", tolerance, measured, summary)
    if session.device.type != "cuda":
        memory = Check(f"memory/{sampler.name}/{precision}", "skipped: needs CUDA", "recorded only")
    else:
        peaks = {"eager": eager_mb, "compiled_first": first_mb, "compiled_second": replay_mb}
        memory = Check(f"memory/{sampler.name}/{precision}", "recorded", "recorded only",
                       {"mode": mode, "peak_mib": peaks},
                       " ".join(f"{name} {value:.1f}" for name, value in peaks.items()) + " MiB")
    return [tokens, memory]


# ---------------------------------------------------------------------------------------------
# Single network calls: compiled against eager, and CUDA-graph replays
# ---------------------------------------------------------------------------------------------

def network_inputs(session: Session, model_name: str, variant: int) -> dict:
    """Inputs of one network call as a sampling step makes them; `variant` 0 and 1 differ in every
    token and (PGM) in the clean set's and the queries' sizes, within the same buckets."""
    model, shapes, device = session.models[model_name], session.shapes, session.device
    config = model.config
    generator = torch.Generator().manual_seed(100 + variant)
    rows = shapes.batch
    if model_name in ("pgm", "image-pgm"):
        # 20 and 27 clean tokens share the bucket 32, 5 and 9 queries the bucket 16: one CUDA graph.
        clean, queries = (SMALLEST_BUCKET + 4, 5) if variant == 0 else (SMALLEST_BUCKET + 11, 9)
        length = config.length
        assert clean + queries <= length, f"{model_name}'s {length} positions cannot hold the network check's inputs"
        positions = torch.stack([torch.randperm(length, generator=generator) for _ in range(rows)])
        tokens = torch.randint(0, config.mask_token_id, (rows, length), generator=generator)
        labels = torch.arange(rows) % (shapes.classes + 1) if config.num_classes else None
        return {"tokens": tokens.to(device), "positions": positions.to(device), "clean": clean,
                "queries": positions[:, clean:clean + queries].contiguous().to(device),
                "cond": None if labels is None else labels.to(device)}
    length = config.length
    tokens = torch.randint(0, config.mask_token_id, (rows, length), generator=generator)
    masked = torch.rand(rows, length, generator=generator) < 0.5
    tokens = torch.where(masked, config.mask_token_id, tokens)
    labels = torch.arange(rows) % (shapes.classes + 1) if model_name == "maskgit" else None
    return {"tokens": tokens.to(device), "cond": None if labels is None else labels.to(device)}


def network_call(model, model_name: str, inputs: dict, mode: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the compiled call's own output, the logits the sampler reads from it) as the sampling loop
    makes the call; eager when `mode` is None."""
    if model_name in ("pgm", "image-pgm"):
        tokens, positions, clean, queries = inputs["tokens"], inputs["positions"], inputs["clean"], inputs["queries"]
        if mode is None:
            logits = model.predict(tokens[:, :clean], positions[:, :clean], queries, None, inputs["cond"],
                                   check_inputs=False)
        else:
            logits = compiled_predict(model, mode, tokens, positions, clean, None, queries, inputs["cond"])
        return logits, logits
    if model_name == "mdlm":  # the loop compiles `encode` and reads the logits from its states eagerly
        if mode is None:
            hidden, cond_vector = model.encode(inputs["tokens"], None, check_inputs=False)
        else:
            hidden, cond_vector = compiled_call(model, "encode", mode, inputs["tokens"], None, check_inputs=False)
        return hidden, model.output_layer(hidden, cond_vector)
    if mode is None:
        logits = model(inputs["tokens"], inputs["cond"], check_inputs=False)
    else:
        logits = compiled_call(model, "forward", mode, inputs["tokens"], inputs["cond"], check_inputs=False)
    return logits, logits


def check_calls(session: Session, model_name: str, precision: str) -> list[Check]:
    """logits/MODEL/PRECISION and replay/MODEL/PRECISION."""
    model, mode, device = session.models[model_name], session.mode, session.device
    # bf16: each call against eager bf16 within twice the tolerance (both may be 2% from float32).
    tolerance = 2 * BF16_LOGITS if precision == "bf16" else FP32_LOGITS
    inputs = [network_inputs(session, model_name, variant) for variant in (0, 1)]
    if model_name in ("pgm", "image-pgm"):
        pairs = {(bucket(i["clean"]), bucket(i["queries"].shape[1])) for i in inputs}
        assert pairs == {(2 * SMALLEST_BUCKET, SMALLEST_BUCKET)}, f"A and B must share their buckets, got {pairs}"
    skips = counters["inductor"]["cudagraph_skips"]
    with torch.no_grad():  # as the sampling loops: grad mode is part of what a compiled graph is for
        float32 = [network_call(model, model_name, i, None)[1].float() for i in inputs]
        with autocast(device, precision):
            eager = [network_call(model, model_name, i, None)[1].float() for i in inputs]
            sequence = [0, 1, 0, 1, 0]  # a replay of each after the other: the CUDA graph's memory reused
            outputs, held_after_next = [], None
            for position, which in enumerate(sequence):
                raw, logits = network_call(model, model_name, inputs[which], mode)
                outputs.append(logits.float().clone())  # consumed before the next call, as the samplers do
                if position == 0:
                    first_raw, first_copy = raw, raw.clone()
                elif position == 1:
                    held_after_next = held_output_state(first_raw, first_copy)
    session.count_skips(model_name, precision, skips)
    errors = [relative_error(output, eager[which]) for output, which in zip(outputs, sequence)]
    to_float32 = relative_error(outputs[0], float32[0])
    shared = min(e.shape[1] for e in eager)  # the PGM's B has more queries than A: compare the first ones
    apart = relative_error(eager[0][:, :shared], eager[1][:, :shared])
    logits_measured = {"mode": mode, "precision": precision, "compiled_vs_eager": errors[0],
                       "eager_vs_fp32": relative_error(eager[0], float32[0]), "compiled_vs_fp32": to_float32}
    if precision == "bf16":
        logits_passed = errors[0] <= tolerance and to_float32 <= BF16_LOGITS
        logits_tolerance = f"max|diff|/max|eager| <= {BF16_LOGITS} against eager fp32, {tolerance} against eager bf16"
    else:
        logits_passed = errors[0] <= tolerance
        logits_tolerance = f"max|diff|/max|eager| <= {tolerance}"
    logits_summary = f"{errors[0]:.2e}" + (f" (vs fp32 {to_float32:.2e})" if precision == "bf16" else "")
    logits_check = Check(f"logits/{model_name}/{precision}", "pass" if logits_passed else "fail", logits_tolerance,
                         logits_measured, logits_summary)
    replay_measured = {"mode": mode, "precision": precision, "calls": ["AB"[w] for w in sequence],
                       "error_per_call": errors, "inputs_apart": apart,
                       "first_output_held_past_the_next_call": held_after_next}
    # A stale output (the other input's logits) is `apart` from the right ones: that must be well
    # beyond the tolerance, or the check could not tell one from the other.
    replay_passed = max(errors) <= tolerance and apart > 2 * tolerance
    replay_check = Check(f"replay/{model_name}/{precision}", "pass" if replay_passed else "fail",
                         f"every call max|diff|/max|eager| <= {tolerance}; A and B apart > {2 * tolerance:g}",
                         replay_measured, f"worst {max(errors):.2e}, apart {apart:.2f}, held: {held_after_next}")
    if not session.records_cuda_graphs:
        replay_check.measured["note"] = f"stand-in: compile mode {mode} on {device.type} records no CUDA graphs"
        replay_check.summary += " (no CUDA graphs)"
    return [logits_check, replay_check]


def held_output_state(raw: torch.Tensor, copy: torch.Tensor) -> str:
    """What became of a compiled call's output kept, uncloned, past the next call: CUDA graph trees
    rewrite it ("overwritten") or refuse to read it ("refused"); without CUDA graphs it is "intact".
    Recorded, not judged: the samplers consume each output before the next call."""
    try:
        return "intact" if torch.equal(raw, copy) else "overwritten"
    except RuntimeError as error:
        return f"refused ({str(error).splitlines()[0][:80]})"


def check_cudagraphs(session: Session, model_name: str, precision: str) -> Check:
    name = f"cudagraphs/{model_name}/{precision}"
    if session.device.type != "cuda":
        return Check(name, "skipped: needs CUDA", "no cudagraph skips")
    if not session.records_cuda_graphs:
        return Check(name, f"skipped: compile mode {session.mode} records no CUDA graphs", "no cudagraph skips")
    skips = session.cudagraph_skips.get((model_name, precision), 0)
    # The reasons logged so far, of every model: a log record does not say which model it is about.
    reasons = session.skip_reasons.reasons[:10]
    return Check(name, "pass" if skips == 0 else "fail", "no cudagraph skips (inductor's counter)",
                 {"cudagraph_skips": skips, "reasons_logged_so_far": reasons},
                 f"skips {skips}" + (f": {reasons[0]}" if skips and reasons else ""))


def check_encoder_cache(session: Session) -> Check:
    """The PGM's encoder cache, compiled: refused today (its loop is eager), so skipped with the
    refusal's reason; should the settings ever accept it, refreshing every step must give the
    uncached sampler's tokens, compiled as eagerly."""
    shapes, mode = session.shapes, session.mode
    try:
        SamplerSettings(cache_refresh=1).resolve("pgm", "text", unknown=shapes.text_length - 1, compile=mode)
    except SamplingError as refusal:
        raise Skip(str(refusal)) from None
    bos, bos_known = text_prompts(shapes, session.device, ragged=False)

    def sample(**options):
        return sample_pgm(session.models["pgm"], known_tokens=bos, known_mask=bos_known, steps=shapes.text_steps,
                          generator=torch.Generator(device=session.device).manual_seed(0), **options)

    share = equal_share(sample(cache_refresh=1, compile=mode), sample(), ~bos_known)
    return Check("cache/pgm", "pass" if share == 1.0 else "fail", "refresh every step: the uncached tokens (fp32)",
                 {"equal_share": share}, f"equal {share:.3f}")


# ---------------------------------------------------------------------------------------------
# Training in bf16 autocast
# ---------------------------------------------------------------------------------------------

TRAINING_PRESETS = ("text-tiny", "mdlm-tiny", "ar-tiny", "vq-tiny", "image-pgm-tiny", "maskgit-tiny")
IMAGE_PRESETS = ("vq-tiny", "image-pgm-tiny", "maskgit-tiny")
# --quick (a dry run of the script, on a CPU in 2 minutes): one text and the image path's two kinds.
QUICK_TRAINING_PRESETS = ("text-tiny", "vq-tiny", "maskgit-tiny")
SHORT_RUN = ["max_steps=2", "log_every=1", "save_every=2", "eval_every=1000", "eval_rows=8"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes (the MNIST format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", size) for size in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def ensure_fashion_mnist(root: Path) -> str:
    """Fashion-MNIST where it is installed, else random images in its format (a lent GPU machine
    reaches no network): the bf16 check compares two precisions on the same images, whichever."""
    from pgm.data.image_sets import fashion_mnist_dir, load_fashion_mnist

    try:
        load_fashion_mnist("test")
        return str(fashion_mnist_dir())
    except DataError:
        pass
    folder = root / "fashion-mnist-random"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 256), ("t10k", 64)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (count,)))
    os.environ["PGM_FASHION_MNIST"] = str(folder)
    return f"random images in Fashion-MNIST's format ({folder})"


class TrainingRuns:
    """Two-step runs of the presets, each trained once, in a temporary folder."""

    def __init__(self, root: Path, device: torch.device):
        self.root, self.device, self.done = root, device, {}
        self.images = None

    def run(self, name: str, precision: str) -> tuple[list[dict], list[str]]:
        """(the training steps' records, the log lines) of `name` at `precision`."""
        from pgm.presets import preset
        from pgm.train import train

        if (name, precision) in self.done:
            return self.done[name, precision]
        extra = []
        if name in IMAGE_PRESETS:
            self.images = self.images or ensure_fashion_mnist(self.root)
            extra = ["data.limit_images=32"]
            if name != "vq-tiny":  # both precisions read the codes of the float32 VQ run
                self.run("vq-tiny", "fp32")
                extra.append(f"data.tokenizer=vq:{self.root / 'vq-tiny-fp32'}")
        out, lines = self.root / f"{name}-{precision}", []
        config = preset(name).with_overrides([*SHORT_RUN, f"train.precision={precision}",
                                               f"train.device={self.device}", *extra])
        train(config, out, log=lambda *parts: lines.append(" ".join(map(str, parts))))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        self.done[name, precision] = [r for r in records if "loss" in r], lines
        return self.done[name, precision]


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def check_training(runs: TrainingRuns, name: str) -> Check:
    low, lines = runs.run(name, "bf16")
    high, _ = runs.run(name, "fp32")
    # The VQ's codebook lookup is an argmin: one code flipped by a rounding moves its loss
    # discontinuously after the first update, so only its first step is compared (as tests/test_bf16.py).
    compared = 1 if name == "vq-tiny" else len(high)
    steps = [{"step": mine["step"], "loss_bf16": mine["loss"], "loss_fp32": theirs["loss"],
              "loss_relative": relative(mine["loss"], theirs["loss"]), "grad_norm_bf16": mine["grad_norm"],
              "grad_norm_fp32": theirs["grad_norm"], "grad_norm_relative": relative(mine["grad_norm"],
                                                                                    theirs["grad_norm"])}
             for mine, theirs in zip(low, high)]
    finite = all(math.isfinite(s["loss_bf16"]) and math.isfinite(s["grad_norm_bf16"]) for s in steps)
    within = all(s["loss_relative"] < TRAINING_LOSS and s["grad_norm_relative"] < TRAINING_GRAD_NORM
                 for s in steps[:compared])
    # The gradients are where bf16 shows, and must show, or autocast never ran.
    autocast_ran = any("(bf16 autocast)" in line for line in lines) and steps[0]["grad_norm_relative"] > 0
    passed = finite and within and autocast_ran and [s["step"] for s in steps] == [1, 2]
    measured = {"steps": steps, "compared_steps": compared, "finite": finite, "autocast_ran": autocast_ran,
                "images": runs.images if name in IMAGE_PRESETS else None}
    worst = max(steps[:compared], key=lambda s: s["loss_relative"])
    summary = (f"loss {worst['loss_relative']:.1e}, grad norm "
               f"{max(s['grad_norm_relative'] for s in steps[:compared]):.1e} over {compared} step(s)")
    return Check(f"training/{name}", "pass" if passed else "fail",
                 f"finite; relative to fp32: loss < {TRAINING_LOSS}, grad norm < {TRAINING_GRAD_NORM}; "
                 "autocast ran (grad norms differ)", measured, summary)


# ---------------------------------------------------------------------------------------------
# Running, reporting
# ---------------------------------------------------------------------------------------------

def guarded(name: str, tolerance: str, function, *args) -> list[Check]:
    """function(*args): a check or a list of them; an error is that check's failure, not the script's end."""
    started = time.perf_counter()
    try:
        result = function(*args)
    except Skip as skip:
        result = Check(name, f"skipped: {skip}", tolerance)
    except Exception as error:  # noqa: BLE001 - any error is this check's failure, reported with its cause
        tail = traceback.format_exc().strip().splitlines()[-6:]
        result = Check(name, "fail", tolerance, {"error": f"{type(error).__name__}: {error}", "traceback": tail},
                       f"{type(error).__name__}: {str(error).splitlines()[0][:90] if str(error) else ''}")
    checks = result if isinstance(result, list) else [result]
    checks[0].seconds = time.perf_counter() - started  # the group's time, on its first check
    return checks


def run_checks(session: Session, precisions, parts, training_presets, done, only=None) -> list[Check]:
    """Every check asked for, in order; `done(checks so far)` after each one. `only`: the samplers,
    models and presets to check (default: all)."""

    def asked(name: str) -> bool:
        return not only or name in only

    checks: list[Check] = []

    def add(new: list[Check]) -> None:
        checks.extend(new)
        done(checks)

    if "sampling" in parts:
        for precision in precisions:  # float32 first: its eager tokens are the bf16 rows' yardstick
            for sampler in filter(lambda sampler: asked(sampler.name), samplers(session.shapes, session.device)):
                add(guarded(f"tokens/{sampler.name}/{precision}", "see the tokens checks", check_tokens, session,
                            sampler, precision))
            for model_name in filter(asked, session.models):
                add(guarded(f"calls/{model_name}/{precision}", "see the logits and replay checks", check_calls,
                            session, model_name, precision))
                add([check_cudagraphs(session, model_name, precision)])
        if asked("pgm"):
            add(guarded("cache/pgm", "refresh every step: the uncached tokens (fp32)", check_encoder_cache,
                        session))
    if "training" in parts:
        with tempfile.TemporaryDirectory(prefix="pgm-bf16-") as folder:
            runs = TrainingRuns(Path(folder), session.device)
            for name in filter(asked, training_presets):
                add(guarded(f"training/{name}", "see the training checks", check_training, runs, name))
    return checks


def table_line(check: Check) -> str:
    """One row: the check, its result, what it measured (a skip: why), and the seconds it took."""
    result, _, reason = check.status.partition(": ")
    measured = reason or check.summary
    measured = measured if len(measured) <= 66 else measured[:63] + "..."
    seconds = f"{check.seconds:.1f}s" if check.seconds else ""
    return f"{check.name:<30} {result:<9} {measured:<66} {seconds:>6}"


def table(checks: list[Check]) -> str:
    lines = [f"{'check':<30} {'result':<9} {'measured':<66} {'time':>6}"]
    lines += [table_line(check) for check in checks]
    lines.append("tolerances:")
    for check in checks:  # one line per kind of check (and precision)
        parts = check.name.split("/")
        kind = f"{parts[0]}/*/{parts[2]}" if len(parts) == 3 else parts[0]
        line = f"  {kind:<18} {check.tolerance}"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)


def environment(device: torch.device, mode: str, quick: bool, precisions) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "compile_mode": mode, "precisions": list(precisions), "quick": quick}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the point) or cpu (a dry run)")
    parser.add_argument("--out", type=Path, help="write the checks here as JSON")
    parser.add_argument("--quick", action="store_true", help="toy shapes")
    parser.add_argument("--compile", choices=COMPILE_MODES,
                        help="the mode compared with eager (default: reduce-overhead on a GPU, default on a CPU)")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"),
                        help="default: fp32 and bf16 on a GPU (bf16 autocast is what it samples and trains in), "
                             "fp32 on a CPU (its precision, bf16 being hundreds of times slower there)")
    parser.add_argument("--parts", nargs="+", choices=("sampling", "training"), default=["sampling", "training"],
                        help="sampling: the tokens, logits, replay, cudagraphs, cache and memory checks; training: "
                             "the bf16 training checks")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="check only these samplers, models and presets (e.g. pgm text-tiny: a short dry run)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    mode = args.compile or ("reduce-overhead" if on_gpu else "default")
    precisions = [p for p in ("fp32", "bf16") if p in (args.precisions or (["fp32", "bf16"] if on_gpu else ["fp32"]))]
    started = time.perf_counter()
    print(f"gpu correctness on {device} ({'toy' if args.quick else 'full'} shapes), compile {mode} against eager, "
          f"precisions {' '.join(precisions)}; torch {torch.__version__}", flush=True)
    session = Session(device, mode, QUICK if args.quick else FULL)
    training_presets = QUICK_TRAINING_PRESETS if args.quick else TRAINING_PRESETS
    known = {*(sampler.name for sampler in samplers(session.shapes, session.device)), *session.models,
             *training_presets}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: not a sampler, model or preset here ({', '.join(sorted(known))})")
    printed = 0

    def report(checks: list[Check], finished: bool = False) -> dict:
        """The JSON, written after every check: a device command cut off by its time limit still
        leaves the checks it finished."""
        counts = {status: sum(c.status.startswith(status) for c in checks)
                  for status in ("pass", "fail", "recorded", "skipped")}
        failed = [check.name for check in checks if check.status == "fail"]
        result = {**environment(device, mode, args.quick, precisions), "shapes": dataclasses.asdict(session.shapes),
                  "finished": finished, "seconds": time.perf_counter() - started, "counts": counts,
                  "failed": failed, "checks": [dataclasses.asdict(check) for check in checks]}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return result

    def done(checks: list[Check]) -> None:
        nonlocal printed
        for check in checks[printed:]:
            print(table_line(check), flush=True)
        printed = len(checks)
        report(checks)

    checks = run_checks(session, precisions, args.parts, training_presets, done, args.only)
    result = report(checks, finished=True)
    counts = result["counts"]
    print()
    print(table(checks))
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['recorded']} recorded, "
          f"{counts['skipped']} skipped in {result['seconds']:.0f} s" + (f"; wrote {args.out}" if args.out else ""))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
