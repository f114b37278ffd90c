"""`pgm bench`: the speed of sampling, training or image generation, models side by side in one
run; sampling sweeps are lists of the sampler settings' own flags."""

from __future__ import annotations

from ..errors import ArgumentError
from ..formats import check_writable
from ..presets import IMAGE_SHAPES
from ..sampling.compiled import COMPILE_CHOICES, COMPILE_MODES, compile_mode
from ..sampling.settings import add_arguments
from .common import check_counts, given


def register(commands) -> None:
    bench = commands.add_parser("bench", help="speed of sampling or training, models side by side")
    bench.add_argument("what", choices=("sampling", "training", "images"))
    bench.add_argument("--lengths", type=int, nargs="+", help="sampling: sequence lengths (default 256); training: "
                                                               "one length for every model (default: each model's)")
    add_arguments(bench, ("steps", "sampler", "cache_refresh", "cache_growth"), sweep=True,
                  notes={"steps": "sampling and images, a row each (default 64; images: 32)",
                         "sampler": "images (default halton)",
                         "cache_refresh": "sampling, a pgm-cache row each (default: never, without --cache-growth)",
                         "cache_growth": "sampling, a pgm-cache row each"})
    bench.add_argument("--batch-size", type=int, help="sampling: default 8; images: 32 (batch 1 is timed too); "
                                                      "training: default the preset's, 8 for the paper's shapes")
    bench.add_argument("--attention", nargs="+", choices=("dense", "grouped", "jagged"),
                       help="training: a PGM row for each way its training attention runs (default: dense grouped; "
                            "jagged is for a GPU, slow on a CPU)")
    bench.add_argument("--models", nargs="+", default=["pgm", "mdlm", "mdlm-full", "ar"],
                       choices=("pgm", "pgm-cache", "mdlm", "mdlm-full", "ar"),
                       help="mdlm: logits only where tokens are revealed; mdlm-full: logits everywhere; pgm-cache: "
                            "PGM with its encoder cache")
    bench.add_argument("--compile", nargs="+", choices=COMPILE_CHOICES, metavar="MODE",
                       help="sampling: a pgm, mdlm and mdlm-full row for each: eager, or a torch.compile mode ("
                            f"{', '.join(COMPILE_MODES)}; default: eager)")
    bench.add_argument("--hidden", type=int, default=256)
    bench.add_argument("--heads", type=int, default=4)
    bench.add_argument("--pgm-blocks", type=int, nargs=2, default=[4, 4], metavar=("ENCODER", "DECODER"))
    bench.add_argument("--baseline-blocks", type=int, default=8)
    bench.add_argument("--vocab", type=int, default=50258)
    bench.add_argument("--presets", nargs="+", help="training and images: the presets to compare (default: "
                       "text-small mdlm-small ar-small; images: fmnist-pgm fmnist-maskgit); training also takes "
                       "the paper's OpenWebText shapes pgm-owt-8-8, pgm-owt-6-6-1024, mdlm-owt (random weights)")
    bench.add_argument("--shape", nargs="+", choices=tuple(IMAGE_SHAPES),
                       help="images: the released ImageNet models' shapes (494M / 480M parameters), random weights")
    bench.add_argument("--repeats", type=int, default=3, help="timed repetitions (training: training-loss passes)")
    bench.add_argument("--warmup", type=int, help="untimed runs before the timed ones (default 1; training: 2 "
                                                  "passes)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--out-dir", default="benchmarks/results")
    bench.set_defaults(handler=cmd_bench)


def _check_flags(args) -> None:
    """Refuse the flags that do not apply to what is benchmarked, and numbers out of range."""
    check_counts(args, batch_size=1, repeats=1, warmup=0, lengths=2, steps=1, hidden=1, heads=1, pgm_blocks=1,
                 baseline_blocks=1, vocab=2)
    if args.presets is not None and args.what == "sampling":
        raise ArgumentError("--presets chooses the models of bench training and bench images; bench sampling builds "
                            "its models from --hidden, --heads and the block counts")
    if hasattr(args, "sampler") and args.what != "images":
        raise ArgumentError("--sampler applies to bench images")
    if hasattr(args, "steps") and args.what == "training":
        raise ArgumentError("--steps applies to bench sampling and bench images; bench training times --repeats passes")
    caching = hasattr(args, "cache_refresh") or hasattr(args, "cache_growth")
    if caching and (args.what != "sampling" or "pgm-cache" not in args.models):
        raise ArgumentError("--cache-refresh and --cache-growth apply to the pgm-cache model of bench sampling "
                            "(--models ... pgm-cache)")
    if args.attention is not None and args.what != "training":
        raise ArgumentError("--attention applies to bench training")
    if args.compile is not None and args.what != "sampling":
        raise ArgumentError("--compile applies to bench sampling")
    if args.shape is not None and args.what != "images":
        raise ArgumentError("--shape applies to bench images")


def cmd_bench(args) -> int:
    from .. import bench

    _check_flags(args)
    out_dir = check_writable(args.out_dir)
    names = (args.presets or []) + (args.shape or [])
    common = dict(repeats=args.repeats, device=args.device, **({"presets": names} if names else {}),
                  **given(args, warmup="warmup"))
    swept = {name: getattr(args, name) for name in ("steps", "sampler", "cache_refresh", "cache_growth")
             if hasattr(args, name)}
    if args.what == "images":
        report = bench.bench_images(**common, **given(args, batch="batch_size"),
                                    **_renamed(swept, steps="steps_list", sampler="sampler"))
        print(bench.format_images_table(report))
        path = bench.write_report(report, out_dir, "images")
    elif args.what == "sampling":
        shape = bench.Shape(hidden=args.hidden, heads=args.heads, pgm_encoder=args.pgm_blocks[0],
                            pgm_decoder=args.pgm_blocks[1], baseline_blocks=args.baseline_blocks, vocab=args.vocab)
        report = bench.bench_sampling(lengths=args.lengths or [256], shape=shape,
                                      models=args.models, compiles=[compile_mode(m) for m in args.compile or ["eager"]],
                                      **common, **given(args, batch="batch_size"),
                                      **_renamed(swept, steps="steps_list", cache_refresh="cache_refreshes",
                                                 cache_growth="cache_growths"))
        print(bench.format_sampling_table(report))
        path = bench.write_report(report, out_dir, "sampling")
        bench.plot_sampling(report, out_dir / "sampling.png")
    else:
        if args.lengths is not None and len(args.lengths) != 1:
            raise ArgumentError("bench training takes one --lengths value, the length of every model")
        common["steps"] = common.pop("repeats")
        report = bench.bench_training(length=args.lengths[0] if args.lengths else None,
                                      **common, **given(args, batch_size="batch_size", attentions="attention"))
        print(bench.format_training_table(report))
        path = bench.write_report(report, out_dir, "training")
    print(f"wrote {path}")
    return 0


def _renamed(values: dict, **names) -> dict:
    """The values whose names are in `names`, under the names a bench function gives them."""
    return {names[name]: value for name, value in values.items() if name in names}
