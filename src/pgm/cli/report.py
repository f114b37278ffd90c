"""`pgm report`: PGM vs MDLM vs AR (perplexities, sample quality and speed), or distillations round
by round; its sampling sweeps are lists of the sampler settings' own flags."""

from __future__ import annotations

from pathlib import Path

from ..errors import ArgumentError
from ..formats import check_writable
from ..sampling.settings import add_arguments
from .common import check_counts


def register(commands) -> None:
    report = commands.add_parser("report", help="PGM vs MDLM vs AR: perplexities, sample quality and speed; or "
                                                "distillations, round by round")
    report.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or presets to train first; or "
                                                                "distillation runs (pgm distill)")
    report.add_argument("--evaluator", required=True,
                        help="an AR run directory or preset, or hf:NAME (the paper: hf:gpt2-large)")
    report.add_argument("--out", default="reports/latest", help="where report.md, report.json and plots go")
    add_arguments(report, ("steps", "cache_refresh", "cache_growth"), sweep=True,
                  notes={"steps": "a row each (default 16 32 64 128 256; distillations: 8 16 32 64 128)",
                         "cache_refresh": "PGM runs: a row each beside exact sampling (e.g. 1 2 4 never)",
                         "cache_growth": "PGM runs: a row each, refreshed only by growth"})
    report.add_argument("--num-samples", type=int, default=64)
    report.add_argument("--batch-size", type=int, default=32, help="samples drawn at a time")
    report.add_argument("--passes", type=int, help="Monte-Carlo passes of the validation ELBO (default 4)")
    report.add_argument("--tokens", type=int, help="training budget in tokens for presets (default: the preset's)")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--device", default="cpu")
    report.set_defaults(handler=cmd_report)


def cmd_report(args) -> int:
    from .. import report as reports

    check_counts(args, num_samples=1, batch_size=1, passes=1, tokens=1, steps=1)
    steps = getattr(args, "steps", None)
    refreshes, growths = getattr(args, "cache_refresh", None), getattr(args, "cache_growth", None)
    out_dir = check_writable(args.out)
    distillations = [reports.is_distillation(Path(item)) for item in args.runs]
    evaluator = args.evaluator
    if any(distillations):
        if not all(distillations):
            raise ArgumentError("a report compares either distillations (their rounds) or trained runs, not both")
        if args.tokens is not None or args.passes is not None or refreshes or growths:
            raise ArgumentError("--tokens, --passes, --cache-refresh and --cache-growth apply to trained runs; a "
                                "distillation report measures samples")
    if not evaluator.startswith("hf:"):
        evaluator = str(reports.ensure_run(evaluator, out_dir, args.tokens))
    if any(distillations):
        report = reports.build_distill_report([Path(item) for item in args.runs], evaluator,
                                              steps_list=steps or reports.DISTILL_STEPS,
                                              num_samples=args.num_samples, batch_size=args.batch_size,
                                              seed=args.seed, device=args.device)
        path = reports.write_report(report, out_dir, reports.format_distill_markdown, reports.plot_distillation)
    else:
        runs = [reports.ensure_run(item, out_dir, args.tokens) for item in args.runs]
        report = reports.build_report(runs, evaluator, steps_list=steps or reports.STEPS,
                                      num_samples=args.num_samples, batch_size=args.batch_size,
                                      passes=4 if args.passes is None else args.passes, seed=args.seed,
                                      cache_refreshes=refreshes or (), cache_growths=growths or (),
                                      device=args.device)
        path = reports.write_report(report, out_dir)
    print(path.read_text().split("\n![")[0].rstrip())
    print(f"wrote {path}")
    return 0
