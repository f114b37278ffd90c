"""The `pgm` command line: train, sample, eval, report, convert, bench.

Mistakes in what the user asked for (an unknown preset or setting, a wrong value, missing data,
a directory that is not a run, a damaged checkpoint) end with one sentence on stderr and exit
code 2. Set PGM_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from . import __version__


def _load_config_file(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except OSError:
        raise ValueError(f"cannot read the config file {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def cmd_train(args) -> int:
    from .presets import preset
    from .runs import RunConfig, read_run_config
    from .train import train

    if args.resume:
        if args.preset or args.config:
            raise ValueError("--resume continues the saved configuration; drop --preset and --config")
        if not args.out:
            raise ValueError("--resume needs --out RUN_DIR, the run to continue")
        config = read_run_config(Path(args.out)).with_overrides(args.overrides)
    else:
        values = preset(args.preset or "text-small").to_dict()
        if args.config:
            for section, fields in _load_config_file(args.config).items():
                if not isinstance(fields, dict):
                    raise ValueError(f"the config file's {section!r} section must be an object")
                if section == "model" and fields.get("kind", values["model"]["kind"]) != values["model"]["kind"]:
                    values["model"] = fields
                else:
                    values.setdefault(section, {}).update(fields)
        config = RunConfig.from_dict(values).with_overrides(args.overrides)
    out = Path(args.out or Path("runs") / (args.preset or "text-small"))
    started = time.perf_counter()
    train(config, out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wall time {time.perf_counter() - started:.0f} s")
    return 0


def cmd_sample(args) -> int:
    import torch

    from .data import load_tokenizer
    from .generation import decode_samples, generate_tokens, known_from_text
    from .hub import load_pretrained_dir
    from .sampling import SamplingOptions

    run_dir = Path(args.run_dir)
    model, _ = load_pretrained_dir(run_dir, args.weights)
    if not (run_dir / "tokenizer").is_dir():
        raise ValueError(f"{run_dir} has no tokenizer/ directory, so its samples cannot be turned into text")
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    known_tokens, known_mask = known_from_text(tokenizer, num_samples=args.num_samples, length=args.length,
                                               max_length=model.config.length, prompts=args.prompt or (),
                                               templates=args.infill or ())
    length = known_tokens.shape[1]
    steps = args.steps or min(length, 128)
    options = SamplingOptions(temperature=args.temperature, top_p=args.top_p, float64=not args.float32)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    tokens = generate_tokens(model, known_tokens=known_tokens, known_mask=known_mask, steps=steps,
                             sampler=args.sampler, order=args.order, options=options, generator=generator)
    seconds = time.perf_counter() - started
    texts = decode_samples(tokens, tokenizer, known_mask, stop_at_eos=args.stop_at_eos, mark_generated=args.mark)
    for number, text in enumerate(texts, 1):
        print(f"=== sample {number} ===\n{text}\n")
    generated = int((~known_mask).sum())
    print(f"{args.num_samples} x {length} positions, {generated} generated in {steps} steps: {seconds:.2f} s "
          f"({generated / seconds:.0f} generated tokens/s)", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    import contextlib

    import torch

    from .data import load_prepared
    from .eval import generative_perplexity, load_evaluator, validation_elbo
    from .hub import load_pretrained_dir
    from .objectives import objective_for
    from .runs import read_run_config

    run_dir = Path(args.run_dir)
    config = read_run_config(run_dir)
    model, checkpoint = load_pretrained_dir(run_dir, args.weights)
    data = load_prepared(run_dir)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    print(f"run {run_dir} ({config.model.kind}, {checkpoint.name}, {args.weights} weights)")
    if args.passes > 0:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        indices = range(min(args.rows, len(data.val))) if args.rows else None
        exact = config.model.kind == "ar"
        result = validation_elbo(model, objective_for(model), data.val, indices=indices, batch_size=args.batch_size,
                                 passes=1 if exact else args.passes, seed=args.seed, device=device, autocast=autocast,
                                 bos_always_clean=config.train.bos_always_clean)
        if exact:
            print(f"validation: {result.tokens} tokens (exact likelihood)")
            print(f"NLL        {result.nll:.4f} nats/token")
            print(f"perplexity {result.perplexity:.2f}")
        else:
            print(f"validation: {result.tokens} tokens x {result.passes} Monte-Carlo passes")
            print(f"ELBO       {result.nll:.4f} +- {result.stderr:.4f} nats/token")
            print(f"perplexity {result.perplexity:.2f} +- {result.perplexity_stderr:.2f}  "
                  f"(an upper bound: exp of the ELBO)")
        print(f"unigram perplexity of the corpus: {math.exp(data.meta['unigram_val_nll']):.2f}")
    if args.evaluator:
        evaluator = load_evaluator(args.evaluator, device=device)
        steps = args.steps or min(config.model.length - 1, 128)
        generated = generative_perplexity(model, data.tokenizer, evaluator, num_samples=args.num_samples, steps=steps,
                                          batch_size=args.sample_batch_size, sampler=args.sampler, seed=args.seed)
        print(f"generative perplexity {generated.perplexity:.2f} under {evaluator.name} "
              f"({args.num_samples} samples, {steps} steps, {generated.evaluator_tokens} evaluator tokens)")
        print(f"sample entropy {generated.entropy:.3f} nats; sampling {generated.tokens_per_s:.0f} generated tokens/s")
    return 0


def cmd_report(args) -> int:
    from .report import build_report, ensure_run, write_report

    out_dir = Path(args.out)
    runs = [ensure_run(item, out_dir, args.tokens) for item in args.runs]
    evaluator = args.evaluator
    if not evaluator.startswith("hf:"):
        evaluator = str(ensure_run(evaluator, out_dir, args.tokens))
    report = build_report(runs, evaluator, steps_list=args.steps, num_samples=args.num_samples,
                          batch_size=args.batch_size, passes=args.passes, seed=args.seed, device=args.device)
    path = write_report(report, out_dir)
    print(path.read_text().split("\n![")[0].rstrip())
    print(f"wrote {path}")
    return 0


def cmd_convert(args) -> int:
    from .hub import convert_official

    options = dict(pre_query_mode=args.pre_query_mode, length=args.length, mask_token_id=args.mask_id,
                   num_heads=args.num_heads)
    out = convert_official(args.checkpoint, args.out_dir, weights=args.weights, gpt2_file=args.gpt2_file,
                           **{k: v for k, v in options.items() if v is not None})
    print(f"wrote {out} ({(out / 'config.json').stat().st_size} B config, "
          f"{(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB weights)")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    out_dir = Path(args.out_dir)
    if args.what == "sampling":
        shape = bench.Shape(hidden=args.hidden, heads=args.heads, pgm_encoder=args.pgm_blocks[0],
                            pgm_decoder=args.pgm_blocks[1], baseline_blocks=args.baseline_blocks, vocab=args.vocab)
        report = bench.bench_sampling(lengths=args.lengths, steps_list=args.steps, batch=args.batch_size, shape=shape,
                                      repeats=args.repeats, warmup=args.warmup, device=args.device,
                                      models=args.models)
        print(bench.format_sampling_table(report))
        path = bench.write_report(report, out_dir, "sampling")
        bench.plot_sampling(report, out_dir / "sampling.png")
    else:
        report = bench.bench_training(args.presets, steps=args.repeats, device=args.device)
        print(bench.format_training_table(report))
        path = bench.write_report(report, out_dir, "training")
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgm", description="Partition Generative Models and their baselines.")
    parser.add_argument("--version", action="version", version=f"partition-gm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="train a model (one process, or many under torchrun)")
    train.add_argument("--preset", help="a named configuration (default text-small); see pgm.presets")
    train.add_argument("--config", help="a JSON file with model/data/train sections laid over the preset")
    train.add_argument("--out", help="the run directory (default runs/PRESET)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="settings such as model.hidden_size=256 train.lr=1e-3 (or lr=1e-3 when unambiguous)")
    train.set_defaults(handler=cmd_train)

    sample = commands.add_parser("sample", help="generate text from a trained run")
    sample.add_argument("run_dir")
    sample.add_argument("--num-samples", type=int, default=4)
    sample.add_argument("--length", type=int, help="tokens per sample (default: the model's length)")
    sample.add_argument("--steps", type=int, help="decoding steps (default: min(length, 128))")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-p", type=float, default=1.0)
    sample.add_argument("--prompt", action="append", help="text to continue (repeat for different rows)")
    sample.add_argument("--infill", action="append", metavar="TEMPLATE",
                        help="text with gaps of N tokens written {{N}} (repeat for different rows)")
    sample.add_argument("--order", default="random",
                        help="pgm decoding order: random, left-to-right, confidence, margin, entropy")
    sample.add_argument("--stop-at-eos", action="store_true", help="end each sample at its first generated EOS")
    sample.add_argument("--mark", action="store_true", help="wrap generated spans in [[ ]]")
    sample.add_argument("--sampler", help="pgm: uniform (default), binomial, reference; mdlm: ancestral, "
                                          "ancestral-nocache, ancestral-full (logits at every position, as the "
                                          "paper's MDLM); ar: kv-cache, no-cache")
    sample.add_argument("--weights", choices=("ema", "raw"), default="ema")
    sample.add_argument("--float32", action="store_true", help="draw in float32 instead of float64")
    sample.set_defaults(handler=cmd_sample)

    evaluate = commands.add_parser("eval", help="validation perplexity of a trained run")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--passes", type=int, default=4,
                          help="Monte-Carlo passes over the validation rows (0: skip; AR is exact in one)")
    evaluate.add_argument("--rows", type=int, default=0, help="score only the first N validation rows (0: all)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--weights", choices=("ema", "raw"), default="ema")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--evaluator", help="also the generative perplexity of samples, scored by an AR run "
                                              "(a directory) or a Hugging Face causal LM (hf:gpt2-large)")
    evaluate.add_argument("--num-samples", type=int, default=64, help="generative perplexity: samples to draw")
    evaluate.add_argument("--steps", type=int, help="generative perplexity: decoding steps (default min(L-1, 128))")
    evaluate.add_argument("--sampler", help="generative perplexity: the sampler (as in pgm sample)")
    evaluate.add_argument("--sample-batch-size", type=int, default=32)
    evaluate.set_defaults(handler=cmd_eval)

    report = commands.add_parser("report", help="PGM vs MDLM vs AR: perplexities, sample quality and speed")
    report.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or presets to train first")
    report.add_argument("--evaluator", required=True,
                        help="an AR run directory or preset, or hf:NAME (the paper: hf:gpt2-large)")
    report.add_argument("--out", default="reports/latest", help="where report.md, report.json and plots go")
    report.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    report.add_argument("--num-samples", type=int, default=64)
    report.add_argument("--batch-size", type=int, default=32, help="samples drawn at a time")
    report.add_argument("--passes", type=int, default=4, help="Monte-Carlo passes of the validation ELBO")
    report.add_argument("--tokens", type=int, help="training budget in tokens for presets (default: the preset's)")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--device", default="cpu")
    report.set_defaults(handler=cmd_report)

    convert = commands.add_parser("convert", help="import the authors' released checkpoints into our format")
    convert.add_argument("source", choices=("official",), help="official: a Lightning .ckpt of the paper's text models")
    convert.add_argument("checkpoint")
    convert.add_argument("out_dir")
    convert.add_argument("--weights", choices=("ema", "raw"), default="ema")
    convert.add_argument("--gpt2-file", help="a local gpt2.tiktoken to store with the model (offline use)")
    convert.add_argument("--pre-query-mode", choices=("learn", "learn+freqs", "learn+freqs+mean",
                                                       "learn+freqs+logsumexp"),
                         help="override GroupSwap's mode (not visible in the weights; default from the checkpoint)")
    convert.add_argument("--length", type=int, help="override the model length (default from the checkpoint)")
    convert.add_argument("--mask-id", type=int, help="override the mask token id (default from the tokenizer)")
    convert.add_argument("--num-heads", type=int, help="only for files without rotary_emb.inv_freq")
    convert.set_defaults(handler=cmd_convert)

    bench = commands.add_parser("bench", help="speed of sampling or training, models side by side")
    bench.add_argument("what", choices=("sampling", "training"))
    bench.add_argument("--lengths", type=int, nargs="+", default=[256], help="sampling: sequence lengths")
    bench.add_argument("--steps", type=int, nargs="+", default=[64], help="sampling: step counts")
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument("--models", nargs="+", default=["pgm", "mdlm", "mdlm-full", "ar"],
                       choices=("pgm", "mdlm", "mdlm-full", "ar"),
                       help="mdlm: logits only where tokens are revealed; mdlm-full: logits everywhere")
    bench.add_argument("--hidden", type=int, default=256)
    bench.add_argument("--heads", type=int, default=4)
    bench.add_argument("--pgm-blocks", type=int, nargs=2, default=[4, 4], metavar=("ENCODER", "DECODER"))
    bench.add_argument("--baseline-blocks", type=int, default=8)
    bench.add_argument("--vocab", type=int, default=50258)
    bench.add_argument("--presets", nargs="+", default=["text-small", "mdlm-small", "ar-small"],
                       help="training: presets to compare")
    bench.add_argument("--repeats", type=int, default=3, help="timed repetitions (training: optimizer steps)")
    bench.add_argument("--warmup", type=int, default=1, help="sampling: untimed runs before the timed ones")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--out-dir", default="benchmarks/results")
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except (ValueError, OSError) as error:
        if os.environ.get("PGM_DEBUG"):
            raise
        message = str(error).strip() or type(error).__name__
        print(f"pgm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pgm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
