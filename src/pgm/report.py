"""`pgm report`: PGM, MDLM and AR side by side on the same data, measured like the paper.

For each run: the validation perplexity (the ELBO bound for PGM and MDLM, exact for AR), then,
for every step count, N unconditional samples drawn in float64, their generative perplexity
under one evaluator, their mean unigram entropy and the sampling throughput; for PGM runs,
optionally the same with the encoder cache at each of a list of refresh intervals. Written as
report.json, report.md (tables and the paper's targets, met or not) and two plots: generative
perplexity against tokens/s (the paper's Figure 1, with a curve through the cache's refresh
intervals at each step count) and each metric against steps.

Runs can be given as directories or as preset names, which are trained first into
OUT/runs/NAME (continued if already there) with an optional budget of training tokens, so one
command reproduces the comparison from nothing.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from .errors import ArgumentError, RunError
from .eval.generative import load_evaluator
from .formats import CONFIG_FILE, make_directory, write_atomic, write_json
from .pipeline import load
from .sampling.settings import cache_label, cache_settings

STEPS = (16, 32, 64, 128, 256)


def ensure_run(item: str, out_dir: Path, tokens: int | None, log=print) -> Path:
    """A run directory for `item`: the directory itself, or a preset trained into OUT/runs/NAME."""
    from .presets import PRESETS, preset
    from .train import train

    path = Path(item)
    if (path / CONFIG_FILE).is_file():
        return path
    if item not in PRESETS:
        raise ArgumentError(f"{item} is neither a run directory nor a preset ({', '.join(PRESETS)})")
    config = preset(item)
    if tokens:
        steps = math.ceil(tokens / (config.train.batch_size * config.model.length))
        config = config.with_overrides([f"train.max_steps={steps}"])
    run_dir = out_dir / "runs" / item
    log(f"training {item} into {run_dir} ({config.train.max_steps} steps)")
    train(config, run_dir, resume=(run_dir / CONFIG_FILE).is_file(), log=log)
    return run_dir


def sampling_plan(kind: str, length: int, steps_list) -> list[tuple[int, int]]:
    """(steps run, steps asked) for each distinct step count a model of `kind` can take."""
    positions = length - 1
    if kind == "ar":
        plan = {positions: positions}  # one token per step whatever the budget
    elif kind == "pgm":  # at least one token per step: budgets past the positions all run `positions` steps
        plan = {min(steps, positions): steps for steps in sorted(steps_list, reverse=True)}
    else:
        plan = {steps: steps for steps in steps_list}
    return sorted(plan.items())


def measure_run(run_dir: Path, evaluator, *, steps_list=STEPS, num_samples: int = 64, batch_size: int = 32,
                passes: int = 4, seed: int = 0, caches=(), device="cpu", log=print) -> dict:
    """A run's validation perplexity and its samples at each step count; a PGM's also with each
    (cache_refresh, cache_growth) of `caches`."""
    pipe = load(run_dir, device=device)
    kind, length = pipe.config.kind, pipe.config.length
    val = pipe.validation(passes=None if kind == "ar" else passes, seed=seed)  # an AR model's is exact
    log(f"{run_dir}: validation perplexity {val.perplexity:.2f}")
    samples = []
    for steps, asked in sampling_plan(kind, length, steps_list):
        options = dict(num_samples=num_samples, steps=None if kind == "ar" else steps, batch_size=batch_size,
                       seed=seed)
        for refresh, growth in [(None, None)] + (list(caches) if kind == "pgm" else []):
            result = pipe.generative_perplexity(evaluator, cache_refresh=refresh, cache_growth=growth, **options)
            row = {"steps": steps, "asked_steps": asked, "cache_refresh": refresh, "cache_growth": growth,
                   "gen_ppl": result.perplexity,
                   "nll": result.nll, "nll_stderr": result.nll_stderr, "entropy": result.entropy,
                   "tokens_per_s": result.tokens_per_s, "evaluator_tokens": result.evaluator_tokens,
                   "sampling_seconds": result.sampling_seconds}
            if kind == "mdlm":  # the paper's MDLM computes logits at every position: same samples, more work
                full = pipe.generative_perplexity(evaluator, sampler="ancestral-full", **options)
                row["tokens_per_s_logits_everywhere"] = full.tokens_per_s
                row["gen_ppl_logits_everywhere"] = full.perplexity  # equal up to float rounding of the logits
            samples.append(row)
            cache = f" cache {cache_label(refresh, growth)}" if refresh is not None else ""
            log(f"  {kind} {steps:>4} steps{cache}: generative perplexity {result.perplexity:8.2f}, entropy "
                f"{result.entropy:.3f}, {result.tokens_per_s:7.1f} tok/s")
    card = pipe.model.origin.card
    return {"name": run_dir.name, "path": str(run_dir), "kind": kind, "parameters": pipe.model.num_parameters(),
            "checkpoint": Path(pipe.source).name, "tokens_seen": card["tokens_seen"], "length": length,
            "val_ppl": val.perplexity, "val_ppl_stderr": val.perplexity_stderr if kind != "ar" else 0.0,
            "val_exact": kind == "ar", "samples": samples}


def build_report(runs: list[Path], evaluator_spec: str, *, steps_list=STEPS, num_samples: int = 64,
                 batch_size: int = 32, passes: int = 4, seed: int = 0, cache_refreshes=(), cache_growths=(),
                 device="cpu", log=print) -> dict:
    caches = cache_settings(cache_refreshes, cache_growths)  # checked before anything is measured
    evaluator = load_evaluator(evaluator_spec, device=device)
    measured = [measure_run(run, evaluator, steps_list=steps_list, num_samples=num_samples, batch_size=batch_size,
                            passes=passes, seed=seed, caches=caches, device=device, log=log)
                for run in runs]
    evaluator_path = Path(evaluator_spec).resolve() if not evaluator_spec.startswith("hf:") else None
    for run in measured:
        run["self_scored"] = evaluator_path is not None and Path(run["path"]).resolve() == evaluator_path
    return {"evaluator": evaluator_spec, "num_samples": num_samples, "batch_size": batch_size, "seed": seed,
            "passes": passes, "cache_refreshes": list(cache_refreshes), "cache_growths": list(cache_growths),
            "runs": measured,
            "targets": check_targets(measured)}


def _first(runs: list[dict], kind: str) -> dict | None:
    return next((run for run in runs if run["kind"] == kind), None)


def check_targets(runs: list[dict]) -> list[dict]:
    """The paper's claims, as the issue states them for the *-small presets, measured here."""
    pgm, mdlm = _first(runs, "pgm"), _first(runs, "mdlm")
    if pgm is None or mdlm is None:
        return cache_targets(runs)
    targets = [{"what": "PGM validation perplexity / MDLM's", "value": pgm["val_ppl"] / mdlm["val_ppl"],
                "goal": "<= 1.05", "met": pgm["val_ppl"] / mdlm["val_ppl"] <= 1.05}]
    pgm_steps, mdlm_steps = _by_steps(pgm), _by_steps(mdlm)
    if 128 in pgm_steps and 128 in mdlm_steps:
        p, m = pgm_steps[128], mdlm_steps[128]
        targets.append({"what": f"generative perplexity, PGM ({p['steps']} steps) / MDLM (128 steps)",
                        "value": p["gen_ppl"] / m["gen_ppl"], "goal": "<= 1 (ratio)",
                        "met": p["gen_ppl"] <= m["gen_ppl"]})
        targets.append({"what": "sample entropy, PGM / MDLM at the same steps", "value": p["entropy"] / m["entropy"],
                        "goal": "within 2% of 1", "met": abs(p["entropy"] / m["entropy"] - 1) <= 0.02})
    common = sorted(set(pgm_steps) & set(mdlm_steps))
    if common:
        worst, ratio = _lowest_speed_ratio(pgm_steps, mdlm_steps, common, "tokens_per_s")
        targets.append({"what": f"sampling throughput PGM / MDLM, lowest over steps {common} (at {worst})",
                        "value": ratio, "goal": ">= 4", "met": ratio >= 4})
        worst, ratio = _lowest_speed_ratio(pgm_steps, mdlm_steps, common, "tokens_per_s_logits_everywhere")
        targets.append({"what": f"the same against MDLM with logits at every position (the paper's), at {worst}",
                        "value": ratio, "goal": ">= 4", "met": ratio >= 4})
    return targets + cache_targets(runs)


def _cache_words(row: dict) -> str:
    if row.get("cache_growth") is not None:
        return f"refresh at growth {row['cache_growth']:g}"
    return f"refresh {row['cache_refresh']}"


def cache_targets(runs: list[dict]) -> list[dict]:
    """For each PGM run and step count measured with the encoder cache: the speed-up of the
    fastest refresh interval whose samples are as good as exact sampling's (generative
    perplexity within 10%, entropy within 2%: the cache issue's bar)."""
    targets = []
    for run in runs:
        if run["kind"] != "pgm":
            continue
        exact = _by_steps(run)
        for asked, reference in exact.items():
            cached = [row for row in run["samples"] if row["asked_steps"] == asked and row.get("cache_refresh")]
            if not cached:
                continue
            good = [row for row in cached if row["gen_ppl"] <= 1.1 * reference["gen_ppl"]
                    and abs(row["entropy"] / reference["entropy"] - 1) <= 0.02]
            best = max(good, key=lambda row: row["tokens_per_s"], default=None)
            ratio = best["tokens_per_s"] / reference["tokens_per_s"] if best else 0.0
            which = _cache_words(best) if best else "none qualifies"
            targets.append({"what": f"{run['name']} at {reference['steps']} steps: tokens/s of the fastest cache "
                                    f"within 10% generative perplexity and 2% entropy of exact ({which}) / exact",
                            "value": ratio, "goal": ">= 2", "met": ratio >= 2})
    return targets


def _lowest_speed_ratio(pgm_steps: dict, mdlm_steps: dict, common: list[int], mdlm_key: str) -> tuple[int, float]:
    """(steps, value) of the lowest PGM / MDLM tokens/s over the `common` step counts."""
    ratios = {steps: pgm_steps[steps]["tokens_per_s"] / mdlm_steps[steps][mdlm_key] for steps in common}
    worst = min(ratios, key=ratios.get)
    return worst, ratios[worst]


def _targets_table(targets: list[dict]) -> list[str]:
    """The markdown lines of a report's targets (none: no table)."""
    if not targets:
        return []
    return ["", "| target | measured | goal | met |", "|---|---:|---|---|"] + [
        f"| {t['what']} | {t['value']:.3f} | {t['goal']} | {'yes' if t['met'] else '**no**'} |" for t in targets]


def format_markdown(report: dict, plots: list[str]) -> str:
    runs = report["runs"]
    lines = ["# PGM, MDLM and AR side by side", "",
             f"Evaluator: `{report['evaluator']}`. {report['num_samples']} samples per point, drawn in float64 "
             f"{report['batch_size']} at a time after a BOS; seed {report['seed']}. Validation perplexity: the ELBO "
             f"bound over {report['passes']} Monte-Carlo passes for diffusion models (+- its standard error), exact "
             f"for AR.", "",
             "| run | kind | parameters | tokens seen | checkpoint | validation perplexity |",
             "|---|---|---:|---:|---|---:|"]
    for run in runs:
        spread = f" +- {run['val_ppl_stderr']:.2f}" if math.isfinite(run["val_ppl_stderr"]) else " (one pass)"
        val = f"{run['val_ppl']:.2f}" + (" (exact)" if run["val_exact"] else spread)
        lines.append(f"| {run['name']} | {run['kind']} | {run['parameters'] / 1e6:.2f}M | "
                     f"{run['tokens_seen'] / 1e6:.2f}M | {run['checkpoint']} | {val} |")
    mdlm = _first(runs, "mdlm")
    mdlm_rows = _by_steps(mdlm) if mdlm else {}
    lines += ["", "| run | steps | encoder cache | generative perplexity | entropy | tokens/s | x MDLM speed | "
              "x MDLM, logits everywhere | evaluator NLL +- s.e. |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        for row in run["samples"]:
            reference = mdlm_rows.get(row["asked_steps"]) if run["kind"] != "ar" else None
            ratios = [f"{row['tokens_per_s'] / reference[key]:.2f}" if reference else "-"
                      for key in ("tokens_per_s", "tokens_per_s_logits_everywhere")]
            steps = str(row["steps"]) + (f" ({row['asked_steps']} asked)" if row["asked_steps"] != row["steps"]
                                         and run["kind"] != "ar" else "")
            note = " (self-scored)" if run["self_scored"] else ""
            cache = "-" if row.get("cache_refresh") is None else _cache_words(row)
            nll = f"{row['nll']:.3f} +- {row['nll_stderr']:.3f}" if "nll" in row else "-"
            lines.append(f"| {run['name']}{note} | {steps} | {cache} | {row['gen_ppl']:.2f} | {row['entropy']:.3f} | "
                         f"{row['tokens_per_s']:.1f} | {ratios[0]} | {ratios[1]} | {nll} |")
    lines += _targets_table(report["targets"])
    lines += ["", "Notes: PGM decodes at least one token per step, so a budget past the number of positions "
              "runs one step per position; AR takes one step per token. `x MDLM speed` compares with our MDLM, "
              "which computes logits only where tokens are revealed; the last column with the paper's MDLM, "
              "which computes them everywhere (the same samples). A self-scored run is scored by its own "
              "model, which flatters it. Encoder cache: a PGM step encodes only the tokens committed since the "
              "last step and re-encodes the whole clean set every N steps (refresh 1 is exact sampling), or "
              "whenever the clean set has grown by a fraction F since the last refresh (growth F). The last "
              "column is the evaluator's NLL per token (the log of the generative perplexity) with its standard "
              "error over the samples."]
    lines += [""] + [f"![{plot}]({plot})" for plot in plots]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({run["length"] for run in report["runs"]})
    figure, axes = plt.subplots(1, len(lengths), figsize=(7.5 * len(lengths), 5.2), squeeze=False)
    # The runs' lines take the first colours of the cycle, the cache's curves the rest.
    colors = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"][len(report["runs"]):])
    for axis, length in zip(axes[0], lengths):
        for run in (run for run in report["runs"] if run["length"] == length):
            rows = list(_by_steps(run).values())
            line, = axis.plot([r["tokens_per_s"] for r in rows], [r["gen_ppl"] for r in rows], "o-", label=run["name"])
            for r in rows:
                axis.annotate(str(r["steps"]), (r["tokens_per_s"], r["gen_ppl"]), textcoords="offset points",
                              xytext=(3, 3), fontsize=7)
            for steps, exact in _by_steps(run).items():  # the cache's curve: exact, then each refresh interval
                cached = [r for r in run["samples"] if r["asked_steps"] == steps and r.get("cache_refresh")]
                if not cached:
                    continue
                curve = [exact] + [r for r in cached if r.get("cache_growth") is None]
                color = next(colors)
                axis.plot([r["tokens_per_s"] for r in curve], [r["gen_ppl"] for r in curve], "^--", color=color,
                          label=f"{run['name']}, {exact['steps']} steps, cache refresh every N")
                grown = [r for r in cached if r.get("cache_growth") is not None]
                if grown:
                    axis.plot([r["tokens_per_s"] for r in grown], [r["gen_ppl"] for r in grown], "*", markersize=11,
                              color=color, label=f"{run['name']}, {exact['steps']} steps, cache refresh at growth F")
                for r in cached:
                    axis.annotate(cache_label(r["cache_refresh"], r.get("cache_growth")),
                                  (r["tokens_per_s"], r["gen_ppl"]), textcoords="offset points", xytext=(4, -9),
                                  fontsize=7, color=color)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("generated tokens / s")
        axis.set_ylabel(f"generative perplexity ({report['evaluator']})")
        axis.set_title(f"length {length}: quality against speed (labels: steps; cache: refresh every N, or gF)",
                       fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / "frontier.png", dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    for key, axis, label in (("gen_ppl", axes[0], "generative perplexity"), ("entropy", axes[1], "entropy (nats)"),
                             ("tokens_per_s", axes[2], "generated tokens / s")):
        for run in report["runs"]:
            rows = list(_by_steps(run).values())
            axis.plot([r["steps"] for r in rows], [r[key] for r in rows], "o-" if len(rows) > 1 else "s",
                      label=run["name"])
        axis.set_xscale("log", base=2)
        if key != "entropy":
            axis.set_yscale("log")
        axis.set_xlabel("steps")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "steps.png", dpi=100)
    plt.close(figure)
    return ["frontier.png", "steps.png"]


def write_report(report: dict, out_dir: Path, markdown=format_markdown, plot=plot_report) -> Path:
    """report.json, the plots and report.md (which shows them) in `out_dir`."""
    make_directory(out_dir)
    write_json(out_dir / "report.json", report)
    plots = plot(report, out_dir)
    path = out_dir / "report.md"
    write_atomic(path, markdown(report, plots).encode())
    return path


DISTILL_STEPS = (8, 16, 32, 64, 128)


def is_distillation(run_dir: Path) -> bool:
    from .runs import read_run_config

    return (Path(run_dir) / CONFIG_FILE).is_file() and read_run_config(Path(run_dir)).distill is not None


def measure_distillation(run_dir: Path, evaluator, *, steps_list=DISTILL_STEPS, num_samples: int = 64,
                         batch_size: int = 32, seed: int = 0, device="cpu", log=print) -> dict:
    """Generative perplexity, entropy and speed of every round's model of a distillation (round 0:
    its teacher) at each step count."""
    from .distill import ROUNDS_DIR
    from .runs import read_run_config

    config = read_run_config(run_dir)
    rounds = sorted((p for p in (run_dir / ROUNDS_DIR).glob("round-*") if p.name[6:].isdigit()),
                    key=lambda p: int(p.name[6:]))
    if not rounds:
        raise RunError(f"{run_dir} has no rounds yet ({run_dir / ROUNDS_DIR}): distil first")
    measured = []
    for directory in rounds:
        pipe = load(directory, device=device)
        description = pipe.model.origin.card.get("distillation", {})
        samples = []
        for used, steps in sampling_plan(pipe.config.kind, pipe.config.length, steps_list):
            result = pipe.generative_perplexity(evaluator, num_samples=num_samples, steps=used, batch_size=batch_size,
                                                seed=seed)
            samples.append({"steps": used, "asked_steps": steps, "gen_ppl": result.perplexity,
                            "entropy": result.entropy, "tokens_per_s": result.tokens_per_s})
            log(f"  {run_dir.name} {directory.name} {used:>4} steps: generative perplexity {result.perplexity:8.2f}, "
                f"entropy {result.entropy:.3f}, {result.tokens_per_s:7.1f} tok/s")
        measured.append({"round": description.get("round", int(directory.name[6:])),
                         "trained_for_steps": description.get("sampling_steps"), "samples": samples})
    return {"name": run_dir.name, "path": str(run_dir), "kind": config.model.kind, "teacher": config.distill.teacher,
            "distill": config.distill.to_dict(), "rounds": measured}


def build_distill_report(runs: list[Path], evaluator_spec: str, *, steps_list=DISTILL_STEPS, num_samples: int = 64,
                         batch_size: int = 32, seed: int = 0, device="cpu", log=print) -> dict:
    evaluator = load_evaluator(evaluator_spec, device=device)
    measured = [measure_distillation(run, evaluator, steps_list=steps_list, num_samples=num_samples,
                                     batch_size=batch_size, seed=seed, device=device, log=log) for run in runs]
    return {"evaluator": evaluator_spec, "num_samples": num_samples, "batch_size": batch_size, "seed": seed,
            "runs": measured, "targets": check_distill_targets(measured)}


def _by_steps(measured: dict) -> dict:
    """A run's (or a round's) sample rows by the steps asked, without the encoder cache."""
    return {row["asked_steps"]: row for row in measured["samples"] if row.get("cache_refresh") is None}


def check_distill_targets(runs: list[dict]) -> list[dict]:
    """The distillation issue's targets, where the runs measured them."""
    targets = []
    for run in runs:
        teacher = _by_steps(run["rounds"][0])
        if 16 in teacher and 128 in teacher:
            ratio = teacher[16]["gen_ppl"] / teacher[128]["gen_ppl"]
            targets.append({"what": f"{run['name']} teacher: generative perplexity at 16 steps / at 128",
                            "value": ratio, "goal": ">= 1.3 (step count matters)", "met": ratio >= 1.3})
    pgm, mdlm = _first(runs, "pgm"), _first(runs, "mdlm")
    if pgm is not None and len(pgm["rounds"]) > 1:
        teacher, student = _by_steps(pgm["rounds"][0]), _by_steps(pgm["rounds"][-1])
        if all(s in teacher and s in student for s in (16, 32, 128)):
            gap = math.log(teacher[16]["gen_ppl"]) - math.log(teacher[128]["gen_ppl"])
            closed = (math.log(teacher[16]["gen_ppl"]) - math.log(student[16]["gen_ppl"])) / gap if gap > 0 else 0.0
            targets.append({"what": "PGM student at 16 steps: share of the teacher's 16 -> 128-step gap closed (log)",
                            "value": closed, "goal": ">= 0.5", "met": closed >= 0.5})
            ratio = student[32]["gen_ppl"] / teacher[128]["gen_ppl"]
            targets.append({"what": "PGM student at 32 steps / teacher at 128 (generative perplexity)",
                            "value": ratio, "goal": "<= 1", "met": ratio <= 1})
            worst = max(abs(student[s]["entropy"] / teacher[s]["entropy"] - 1) for s in (16, 32))
            targets.append({"what": "PGM student entropy / teacher's at 16 and 32 steps, worst deviation",
                            "value": worst, "goal": "<= 0.03", "met": worst <= 0.03})
    if pgm is not None and mdlm is not None:
        p, m = _by_steps(pgm["rounds"][-1]), _by_steps(mdlm["rounds"][-1])
        common = sorted(set(p) & set(m))
        if common:
            worst, ratio = _lowest_speed_ratio(p, m, common, "tokens_per_s")
            targets.append({"what": f"distilled PGM / distilled MDLM tokens/s, lowest over steps {common} (at {worst})",
                            "value": ratio, "goal": ">= 3.5", "met": ratio >= 3.5})
    return targets


def format_distill_markdown(report: dict, plots: list[str]) -> str:
    lines = ["# Distillation: every round's model at every step count", "",
             f"Evaluator: `{report['evaluator']}`. {report['num_samples']} unconditional samples per point, drawn in "
             f"float64 {report['batch_size']} at a time after a BOS; seed {report['seed']}. Round 0 is the teacher; "
             "round r's model was trained to sample in the steps given beside it. Cells: generative perplexity "
             "(sample entropy, tokens/s)."]
    for run in report["runs"]:
        settings = run["distill"]
        steps = [row["asked_steps"] for row in run["rounds"][0]["samples"]]
        lines += ["", f"**{run['name']}** ({run['kind']}; teacher `{run['teacher']}`; {settings['divergence']}, "
                  f"{settings['num_distill_steps']} teacher steps per student step, {settings['round_steps']} "
                  "optimisation steps per round)", "",
                  "| round | trained for | " + " | ".join(f"{s} steps" for s in steps) + " |",
                  "|---|---:|" + "---:|" * len(steps)]
        for round_ in run["rounds"]:
            cells = [f"{r['gen_ppl']:.1f} ({r['entropy']:.2f}, {r['tokens_per_s']:.0f})" for r in round_["samples"]]
            name = "teacher" if round_["round"] == 0 else str(round_["round"])
            lines.append(f"| {name} | {round_['trained_for_steps']} | " + " | ".join(cells) + " |")
    lines += _targets_table(report["targets"])
    lines += ["", "PGM decodes at least one token per step: a step count past the positions runs one step per "
              "position."]
    lines += [""] + [f"![{plot}]({plot})" for plot in plots]
    return "\n".join(lines) + "\n"


def plot_distillation(report: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    figure, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.2), squeeze=False, sharey=True)
    for axis, run in zip(axes[0], runs):
        for round_ in run["rounds"]:
            rows = round_["samples"]
            label = "teacher" if round_["round"] == 0 else f"round {round_['round']} ({round_['trained_for_steps']} steps)"
            axis.plot([r["steps"] for r in rows], [r["gen_ppl"] for r in rows], "o-", label=label)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sampling steps")
        axis.set_title(f"{run['name']} ({run['kind']})")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel(f"generative perplexity ({report['evaluator']})")
    figure.tight_layout()
    figure.savefig(out_dir / "distillation.png", dpi=100)
    plt.close(figure)
    return ["distillation.png"]
