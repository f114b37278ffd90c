"""`pgm bench sampling` and `pgm bench training`: speed, measured side by side in one process.

Sampling: PGM vs MDLM vs AR at matched parameter counts, the same vocabulary and batch, in
eval mode, float32 on CPU (bf16 autocast on GPU). Counted: generated tokens only (the BOS at
position 0 is given). Each configuration also gets its floating-point work computed from the
shapes (matmuls and attention, in FLOPs), so that measured ratios can be read against the
ratio of the work, and a floor: the tokens/s the machine would reach running that work at its
own measured matmul throughput.
"""

from __future__ import annotations

import dataclasses
import itertools
import platform
import time
from pathlib import Path

import torch

from .devices import autocast, describe_precision, resolve_device, synchronize
from .errors import ArgumentError
from .formats import make_directory, write_json
from .models import CausalConfig, MaskedDiffusionConfig, PartitionConfig, build_model
from .sampling import SamplingOptions, sample_autoregressive, sample_mdlm, sample_pgm
from .sampling.compiled import check_compile_mode
from .sampling.pgm import RefreshSchedule
from .sampling.settings import NEVER, SamplerSettings, cache_label, cache_settings

COMPILED_MODELS = ("pgm", "mdlm", "mdlm-full")  # the sampling rows that `compiles` multiplies


@dataclasses.dataclass
class Shape:
    hidden: int = 256
    heads: int = 4
    pgm_encoder: int = 4
    pgm_decoder: int = 4
    baseline_blocks: int = 8
    vocab: int = 50258
    cond_dim: int = 128


def build(kind: str, shape: Shape, length: int):
    common = dict(vocab_size=shape.vocab, length=length, hidden_size=shape.hidden, num_heads=shape.heads,
                  cond_dim=shape.cond_dim, dropout=0.0)
    if kind == "pgm":
        config = PartitionConfig(encoder_blocks=shape.pgm_encoder, decoder_blocks=shape.pgm_decoder, **common)
    elif kind.startswith("mdlm"):
        config = MaskedDiffusionConfig(blocks=shape.baseline_blocks, **common)
    else:
        config = CausalConfig(blocks=shape.baseline_blocks, **common)
    torch.manual_seed(0)
    return build_model(config).eval()


# ---------------------------------------------------------------------------------------------
# Floating-point work (multiply-adds counted as 2 FLOPs)
# ---------------------------------------------------------------------------------------------

def _block_flops(tokens: float, keys: float, hidden: int, mlp_ratio: int = 4) -> float:
    """A self-attention block over `tokens` queries attending `keys` keys each."""
    return tokens * (2 * (4 + 2 * mlp_ratio) * hidden ** 2 + 4 * keys * hidden)


def pgm_step_flops(shape: Shape, clean: int, queries: int, encoded: int | None = None) -> float:
    """One PGM call for one row: the encoder over `encoded` of the `clean` tokens (all of them
    unless an encoder cache holds the others), `queries` decoded positions."""
    h = shape.hidden
    encoded = clean if encoded is None else encoded
    encoder = shape.pgm_encoder * _block_flops(encoded, clean, h)
    key_values = (shape.pgm_decoder + 1) * encoded * 4 * h * h  # every decoder layer + GroupSwap project K, V
    per_query = (2 * h * h  # GroupSwap output
                 + 4 * clean * h  # its attention
                 + shape.pgm_decoder * (2 * (2 + 8) * h * h + 4 * clean * h)  # q, out, MLP, attention per layer
                 + 2 * h * shape.vocab)  # logits
    return encoder + key_values + queries * per_query


def pgm_flops(shape: Shape, batch: int, length: int, counts: list[int], cache_refresh=None,
              cache_growth: float | None = None) -> float:
    """Work of a PGM run from a BOS; with the encoder cache (`cache_refresh`: steps, or "never"),
    a call encodes only the tokens committed since the last call, except the refreshes of the
    sampler's own `RefreshSchedule`."""
    schedule = RefreshSchedule(cache_refresh, cache_growth) if cache_refresh is not None else None
    total, clean, last = 0.0, 1, 0  # the BOS starts the clean set
    for k in counts:
        if k:
            full = schedule is None or schedule.due(clean)
            total += batch * pgm_step_flops(shape, clean, k, None if full else clean - last)
            last, clean = clean, clean + k
    return total


def mdlm_flops(shape: Shape, batch: int, length: int, steps: int, logits_everywhere: bool) -> float:
    body = shape.baseline_blocks * _block_flops(length, length, shape.hidden)
    revealed = length - 1
    logits = 2 * shape.hidden * shape.vocab * (length * steps if logits_everywhere else revealed)
    return batch * (steps * body + logits)


def ar_flops(shape: Shape, batch: int, length: int) -> float:
    total = 0.0
    for position in range(1, length):
        total += shape.baseline_blocks * _block_flops(1, position, shape.hidden) + 2 * shape.hidden * shape.vocab
    return batch * total


def matmul_throughput(device: torch.device, hidden: int = 256, repeats: int = 20) -> float:
    """The best float32 FLOP/s over the matmul shapes a transformer of this width runs (token
    rows x hidden x 3-4 hidden, and back): the yardstick for the floors."""
    best = 0.0
    for rows, inner, outer in ((2048, hidden, 4 * hidden), (2048, 4 * hidden, hidden), (2048, hidden, 3 * hidden),
                               (1024, 1024, 1024)):
        a, w = torch.randn(rows, inner, device=device), torch.randn(outer, inner, device=device)
        for _ in range(3):
            torch.nn.functional.linear(a, w)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            torch.nn.functional.linear(a, w)
        synchronize(device)
        best = max(best, 2 * rows * inner * outer * repeats / (time.perf_counter() - started))
    return best


def machine(device: torch.device) -> dict:
    """What a benchmark report says about where it ran."""
    return {"device": str(device), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "dtype": describe_precision(device)}


def uniform_counts(remaining: int, steps: int) -> list[int]:
    return [(i + 1) * remaining // steps - i * remaining // steps for i in range(steps)]


def median(values: list[float]) -> float:
    """The middle value (the upper one of an even count): what every timing here reports."""
    return sorted(values)[len(values) // 2]


def time_sampler(run, device, repeats: int, warmup: int) -> tuple[float, dict]:
    stats: dict = {}
    for _ in range(warmup):
        run({})
    timings = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run(stats)
        synchronize(device)
        timings.append(time.perf_counter() - started)
    return median(timings), stats


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (Linux: KiB)
    except ImportError:
        return None


def bench_sampling(*, lengths=(256,), steps_list=(64,), batch: int = 8, shape: Shape = Shape(),
                   repeats: int = 3, warmup: int = 1, device="cpu", models=("pgm", "mdlm", "mdlm-full", "ar"),
                   cache_refreshes=None, cache_growths=(), compiles=(None,), log=print) -> dict:
    """Tokens/s of each of `models`; "pgm-cache" is PGM with its encoder cache, once for each of
    `cache_refreshes` (re-encode the clean set every N steps, or never: the default without
    growths) and once for each of `cache_growths` (never by count, only when the clean set has
    grown by that fraction since the last refresh). `compiles`: the torch.compile modes (None:
    eager) of a row each for pgm, mdlm and mdlm-full; the warm-up runs compile, so give
    warmup >= 1 with any mode. Ratios compare rows of the same mode."""
    if cache_refreshes is None:
        cache_refreshes = () if cache_growths else (NEVER,)
    caches = cache_settings(cache_refreshes, cache_growths)  # checked before anything is timed
    for mode in compiles:
        check_compile_mode(mode)
    if any(compiles):
        if warmup < 1:
            raise ArgumentError("compiled rows need warmup >= 1: the warm-up run is where they compile")
        if not set(models) & set(COMPILED_MODELS):
            raise ArgumentError(f"compile applies to the {', '.join(COMPILED_MODELS)} rows, and none is asked for")
        if None not in compiles and set(models) - set(COMPILED_MODELS):
            raise ArgumentError("the ar and pgm-cache rows run eagerly: with them, compile must include eager, "
                                "their reference")
    for length in lengths:  # a PGM decodes at least one position per step: it would take fewer than it says
        if max(steps_list) > length - 1 and any(kind.startswith("pgm") for kind in models):
            raise ArgumentError(f"{max(steps_list)} steps is more than the {length - 1} positions a PGM decodes in a "
                                f"row of length {length} (at least one per step)")
    device = resolve_device(device)
    peak = matmul_throughput(device, shape.hidden)
    log(f"matmul throughput {peak / 1e9:.1f} GFLOP/s on {device}")
    rows = []
    options = SamplingOptions()
    for length in lengths:
        built = {kind: build(kind, shape, length).to(device) for kind in {k.removesuffix("-cache") for k in models}}
        variants = [(kind, setting, mode) for kind in models
                    for setting in (caches if kind == "pgm-cache" else [(None, None)])
                    for mode in (compiles if kind in COMPILED_MODELS else (None,))]
        known = torch.zeros(batch, length, dtype=torch.long, device=device)
        known_mask = torch.zeros_like(known, dtype=torch.bool)
        known_mask[:, 0] = True  # a BOS, as in training
        for steps in steps_list:
            for kind, (refresh, growth), mode in variants:
                if kind == "ar" and steps != steps_list[0]:
                    continue  # one step per token whatever the step budget
                model = built[kind.removesuffix("-cache")]

                def run(stats, kind=kind, model=model, refresh=refresh, growth=growth, mode=mode):
                    generator = torch.Generator(device=device).manual_seed(0)
                    common = dict(known_tokens=known, known_mask=known_mask, options=options, generator=generator)
                    with autocast(device):
                        if kind == "pgm-cache":
                            sample_pgm(model, steps=steps, stats=stats, cache_refresh=refresh, cache_growth=growth,
                                       **common)
                        elif kind == "pgm":
                            sample_pgm(model, steps=steps, stats=stats, compile=mode, **common)
                        elif kind == "mdlm":
                            sample_mdlm(model, steps=steps, stats=stats, compile=mode, **common)
                        elif kind == "mdlm-full":
                            sample_mdlm(model, steps=steps, stats=stats, logits_everywhere=True, compile=mode,
                                        **common)
                        else:
                            sample_autoregressive(model, stats=stats, **common)

                seconds, stats = time_sampler(run, device, repeats, warmup)
                if kind.startswith("pgm"):
                    flops = pgm_flops(shape, batch, length, uniform_counts(length - 1, steps), refresh, growth)
                elif kind == "ar":
                    flops = ar_flops(shape, batch, length)
                else:
                    flops = mdlm_flops(shape, batch, length, stats.get("forward_calls", steps), kind == "mdlm-full")
                generated = batch * (length - 1)
                rows.append({
                    "model": kind, "parameters": model.num_parameters(), "length": length,
                    "steps": length - 1 if kind == "ar" else steps, "cache_refresh": refresh,
                    "cache_growth": growth, "cache_refreshes": stats.get("cache_refreshes"), "compile": mode,
                    "batch": batch,
                    "seconds_per_batch": seconds, "tokens_per_s": generated / seconds,
                    "forward_calls": stats.get("forward_calls"), "gflops_per_batch": flops / 1e9,
                    "floor_tokens_per_s": generated / (flops / peak), "peak_memory_mb": peak_memory_mb(device),
                })
                log(f"  {kind:<10} L={length:<5} steps={rows[-1]['steps']:<5} cache={cache_label(refresh, growth):<6} "
                    f"compile={mode or 'eager':<8} {rows[-1]['tokens_per_s']:>9.1f} tok/s")
    def find(model, row, compiled, same_steps=True):
        return next((r for r in rows if r["model"] == model and r["length"] == row["length"]
                     and (r["steps"] == row["steps"] or not same_steps) and r["compile"] == compiled), None)

    for row in rows:
        # A compiled row is compared with the MDLM and PGM compiled the same way, an eager row
        # with the eager ones.
        reference = find("mdlm", row, row["compile"])
        if reference is None and row["model"] == "ar":
            reference = find("mdlm", row, None, same_steps=False)
        row["ratio_to_mdlm"] = row["tokens_per_s"] / reference["tokens_per_s"] if reference else None
        row["work_ratio_to_mdlm"] = reference["gflops_per_batch"] / row["gflops_per_batch"] if reference else None
        exact = find("pgm", row, row["compile"])
        row["ratio_to_pgm"] = row["tokens_per_s"] / exact["tokens_per_s"] if exact and row["model"] != "ar" else None
        eager = find(row["model"], row, None) if row["compile"] else None
        row["ratio_to_eager"] = row["tokens_per_s"] / eager["tokens_per_s"] if eager else None
    return {**machine(device), "matmul_gflops": peak / 1e9, "shape": dataclasses.asdict(shape), "results": rows}


def format_sampling_table(report: dict) -> str:
    mode_width = 2 + max(len(r.get("compile") or "eager") for r in report["results"])
    lines = [f"device {report['device']} ({report['processor']}, {report['threads']} threads), {report['dtype']}, "
             f"matmul {report['matmul_gflops']:.0f} GFLOP/s; generated tokens only",
             f"{'model':<10}{'params':>8}{'L':>6}{'steps':>7}{'cache':>8}{'compile':>{mode_width}}{'tok/s':>9}{'s/batch':>9}"
             f"{'x MDLM':>8}{'x PGM':>7}{'x eager':>8}"
             f"{'work x':>8}{'calls':>7}{'GFLOP':>8}{'floor':>8}{'% floor':>8}{'peak MB':>9}"]
    for r in report["results"]:
        ratio = f"{r['ratio_to_mdlm']:.2f}" if r["ratio_to_mdlm"] else "-"
        work = f"{r['work_ratio_to_mdlm']:.2f}" if r["work_ratio_to_mdlm"] else "-"
        to_pgm = f"{r['ratio_to_pgm']:.2f}" if r.get("ratio_to_pgm") else "-"
        to_eager = f"{r['ratio_to_eager']:.2f}" if r.get("ratio_to_eager") else "-"
        memory = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] else "-"
        lines.append(f"{r['model']:<10}{r['parameters'] / 1e6:>7.1f}M{r['length']:>6}{r['steps']:>7}"
                     f"{cache_label(r.get('cache_refresh'), r.get('cache_growth')):>8}"
                     f"{r.get('compile') or 'eager':>{mode_width}}"
                     f"{r['tokens_per_s']:>9.1f}{r['seconds_per_batch']:>9.2f}{ratio:>8}{to_pgm:>7}{to_eager:>8}{work:>8}"
                     f"{r['forward_calls'] or '-':>7}{r['gflops_per_batch']:>8.0f}{r['floor_tokens_per_s']:>8.0f}"
                     f"{100 * r['tokens_per_s'] / r['floor_tokens_per_s']:>7.0f}%{memory:>9}")
    return "\n".join(lines)


def plot_sampling(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len({r["length"] for r in report["results"]}), figsize=(11, 4), squeeze=False)
    def label(row):
        cache = cache_label(row.get("cache_refresh"), row.get("cache_growth"))
        settings = [s for s in (None if cache == "-" else cache, row.get("compile")) if s]
        return f"{row['model']} ({', '.join(settings)})" if settings else row["model"]

    for axis, length in zip(axes[0], sorted({r["length"] for r in report["results"]})):
        for name in dict.fromkeys(label(r) for r in report["results"]):
            points = [(r["steps"], r["tokens_per_s"]) for r in report["results"]
                      if label(r) == name and r["length"] == length]
            if points:
                axis.plot(*zip(*sorted(points)), "o-" if len(points) > 1 else "s", label=name)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(f"length {length}")
        axis.set_xlabel("steps")
        axis.set_ylabel("generated tokens / s")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(report: dict, out_dir: Path, name: str) -> Path:
    make_directory(out_dir)
    path = out_dir / f"{name}.json"
    write_json(path, report)
    return path


# The paper's OpenWebText models (its Table 3 times their training): GPT-2's vocabulary and a
# mask, length 1024, cond_dim 128, dropout 0.1 as trained.
PAPER_SHAPES = {
    "pgm-owt-8-8": dict(kind="pgm", hidden_size=768, num_heads=12, encoder_blocks=8, decoder_blocks=8),
    "pgm-owt-6-6-1024": dict(kind="pgm", hidden_size=1024, num_heads=16, encoder_blocks=6, decoder_blocks=6),
    "mdlm-owt": dict(kind="mdlm", hidden_size=768, num_heads=12, blocks=12),
}


def training_config(name: str, length: int | None = None):
    """The model config of a preset or of one of the paper's shapes, at `length` if given."""
    from .presets import preset

    if name in PAPER_SHAPES:
        values = dict(PAPER_SHAPES[name])
        kind = values.pop("kind")
        config_class = PartitionConfig if kind == "pgm" else MaskedDiffusionConfig
        config = config_class(vocab_size=50258, length=1024, cond_dim=128, dropout=0.1, **values)
    else:
        config = preset(name).model
    return config if length is None else dataclasses.replace(config, length=length)


def bench_training(presets=("text-small", "mdlm-small", "ar-small"), *, steps: int = 10, warmup: int = 2,
                   batch_size: int | None = None, length: int | None = None, attentions=("dense", "grouped"),
                   device="cpu", log=print) -> dict:
    """Forward and forward+backward time of each model's training loss on random tokens (no
    optimizer step), in train mode (dropout on): presets (their batch size by default) or the
    paper's shapes (`PAPER_SHAPES`, batch 8 by default). A PGM gets one row per training
    attention in `attentions` (`pgm.models.layers.training_attention`); the others have one kind."""
    from .models.layers import training_attention
    from .objectives import objective_for
    from .presets import preset

    device = resolve_device(device)
    rows = []
    for name in presets:
        config = training_config(name, length)
        batch = batch_size or (8 if name in PAPER_SHAPES else preset(name).train.batch_size)
        for attention in attentions if config.kind == "pgm" else ("dense",):
            torch.manual_seed(0)
            model = build_model(config).to(device).train()
            objective = objective_for(model)
            tokens = torch.randint(0, config.vocab_size - 1, (batch, config.length), device=device)
            generator = torch.Generator(device=device).manual_seed(0)
            forward, both = [], []
            for step in range(warmup + steps):
                synchronize(device)
                started = time.perf_counter()
                with autocast(device), training_attention(attention):
                    loss = objective.loss(model, tokens, generator=generator).loss
                synchronize(device)
                middle = time.perf_counter()
                loss.backward()
                model.zero_grad(set_to_none=True)
                synchronize(device)
                if step >= warmup:
                    forward.append(middle - started)
                    both.append(time.perf_counter() - started)
            rows.append({"preset": name, "model": config.kind, "attention": attention,
                         "parameters": model.num_parameters(), "batch": batch, "length": config.length,
                         "forward_s": median(forward), "forward_backward_s": median(both),
                         "forward_seq_per_s": batch / median(forward),
                         "forward_backward_seq_per_s": batch / median(both),
                         "tokens_per_s": batch * config.length / median(both)})
            log(f"  {name:<16} {attention:<8} {rows[-1]['forward_backward_seq_per_s']:>8.2f} seq/s "
                "forward+backward")
            del model, loss
    baseline = next((row for row in rows if row["model"] == "mdlm"), rows[0])
    for row in rows:
        row["ratio_to_baseline"] = row["forward_backward_seq_per_s"] / baseline["forward_backward_seq_per_s"]
    return {**machine(device), "steps": steps, "warmup": warmup, "baseline": baseline["preset"], "results": rows}


def format_training_table(report: dict) -> str:
    lines = [f"device {report['device']} ({report['processor']}, {report['threads']} threads), {report['dtype']}, "
             f"median of {report['steps']} training-loss passes on random tokens (train mode, no optimizer step); "
             f"x: forward+backward sequences/s over {report['baseline']}'s",
             f"{'model':<18}{'kind':<6}{'attention':<10}{'params':>9}{'batch':>6}{'length':>7}{'fwd s':>8}"
             f"{'fwd seq/s':>10}{'fwd+bwd s':>10}{'seq/s':>8}{'tok/s':>8}{'x':>6}"]
    for r in report["results"]:
        lines.append(f"{r['preset']:<18}{r['model']:<6}{r['attention']:<10}{r['parameters'] / 1e6:>8.1f}M"
                     f"{r['batch']:>6}{r['length']:>7}"
                     f"{r['forward_s']:>8.3f}{r['forward_seq_per_s']:>10.2f}{r['forward_backward_s']:>10.3f}"
                     f"{r['forward_backward_seq_per_s']:>8.2f}{r['tokens_per_s']:>8.0f}{r['ratio_to_baseline']:>6.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Images: class-conditional PGM vs MaskGIT
# ---------------------------------------------------------------------------------------------

def bench_images(presets=("fmnist-pgm", "fmnist-maskgit"), *, steps_list=(32,), batch: int = 32,
                 guidance_values=(0.0, 3.0), sampler: str = "halton", repeats: int = 3, warmup: int = 1,
                 device="cpu", log=print) -> dict:
    """Images/s of each model (random weights: speed does not depend on them) at `batch`, and
    the latency of one image, with and without classifier-free guidance; `presets` names presets
    or the released models' shapes (`pgm.presets.IMAGE_SHAPES`). Counted: VQ codes generated; the
    VQ decoder, the same for both, is left out."""
    from .presets import image_model_config
    from .sampling.codes import generate_codes

    device = resolve_device(device)
    rows = []
    for name in presets:
        config = image_model_config(name)
        torch.manual_seed(0)
        model = build_model(config).to(device).eval()
        for steps, guidance, rows_in_batch in itertools.product(steps_list, guidance_values, dict.fromkeys((batch, 1))):
            labels = torch.arange(rows_in_batch, device=device) % config.num_classes

            def run(stats, model=model, labels=labels, guidance=guidance, steps=steps):
                generator = torch.Generator(device=device).manual_seed(0)
                with autocast(device):
                    generate_codes(model, labels, settings=SamplerSettings(steps=steps, sampler=sampler,
                                                                           guidance=guidance),
                                   generator=generator, stats=stats)

            seconds, stats = time_sampler(run, device, repeats, warmup)
            rows.append({"preset": name, "model": config.kind, "parameters": model.num_parameters(),
                         "cells": config.length if config.kind == "maskgit" else config.length - 1,
                         "batch": rows_in_batch, "steps": steps, "sampler": sampler, "guidance": guidance,
                         "seconds_per_batch": seconds, "images_per_s": rows_in_batch / seconds,
                         "forward_calls": stats.get("forward_calls"),
                         "gflops_per_image": image_flops(config, steps, sampler, guidance) / 1e9})
            log(f"  {name:<15} {steps} steps, batch {rows_in_batch:<3} w={guidance:<4} "
                f"{rows[-1]['images_per_s']:>8.3g} images/s")
    for row in rows:
        baseline = next((r for r in rows if r["model"] == "maskgit" and r["batch"] == row["batch"]
                         and r["guidance"] == row["guidance"] and r["steps"] == row["steps"]
                         and r["cells"] == row["cells"]), None)
        row["ratio_to_maskgit"] = row["images_per_s"] / baseline["images_per_s"] if baseline else None
        row["work_ratio_to_maskgit"] = baseline["gflops_per_image"] / row["gflops_per_image"] if baseline else None
    return {**machine(device), "results": rows}


def image_flops(config, steps: int, sampler: str, guidance: float) -> float:
    """FLOPs to generate one image's codes with the arccos schedule; a step with a guidance
    weight > 0 (ramped linearly from 0) runs the conditional and the null row."""
    from .sampling.common import arccos_bounds
    from .sampling.pgm import guidance_weight

    pgm = config.kind == "pgm"
    cells = config.length - 1 if pgm else config.length
    bounds = arccos_bounds(torch.tensor(cells), steps).tolist()
    h = config.hidden_size
    if pgm:
        shape = Shape(hidden=h, heads=config.num_heads, pgm_encoder=config.encoder_blocks,
                      pgm_decoder=config.decoder_blocks, vocab=config.vocab_size)
        clean = 1 + config.registers // 2  # the BOS and group 0's register
    else:
        tokens = config.length + config.registers
        block = tokens * (2 * (4 * h * h + 3 * h * config.ffn_hidden) + 4 * tokens * h)  # SwiGLU: 3 matrices
        maskgit_step = config.depth * block + 2 * h * config.vocab_size * config.length
    total = 0.0
    for step in range(steps):
        new = bounds[step + 1] - bounds[step]
        if pgm:
            queries = new if sampler == "halton" else cells - bounds[step]  # confidence queries every unknown cell
            work = pgm_step_flops(shape, clean, queries)
            clean += new
        else:
            work = maskgit_step
        total += work * (2 if guidance_weight(guidance, step, steps, "linear") else 1)
    return total


def format_images_table(report: dict) -> str:
    lines = [f"device {report['device']} ({report['processor']}, {report['threads']} threads), {report['dtype']}; "
             "VQ codes generated (decoder excluded); work x: MaskGIT's FLOPs per image / the row's",
             f"{'preset':<16}{'params':>8}{'sampler':>11}{'steps':>6}{'w':>5}{'batch':>6}{'images/s':>10}"
             f"{'ms/batch':>10}{'calls':>6}{'MFLOP/img':>10}{'x MaskGIT':>10}{'work x':>8}"]
    for r in report["results"]:
        ratio = f"{r['ratio_to_maskgit']:.2f}" if r["ratio_to_maskgit"] else "-"
        work = f"{r['work_ratio_to_maskgit']:.2f}" if r["work_ratio_to_maskgit"] else "-"
        lines.append(f"{r['preset']:<16}{r['parameters'] / 1e6:>7.2f}M{r['sampler']:>11}{r['steps']:>6}"
                     f"{r['guidance']:>5g}{r['batch']:>6}{r['images_per_s']:>10.3g}"
                     f"{1000 * r['seconds_per_batch']:>10.1f}"
                     f"{r['forward_calls'] or '-':>6}{1000 * r['gflops_per_image']:>10.0f}{ratio:>10}{work:>8}")
    return "\n".join(lines)
