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
from .allocator import keep_freed_memory


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
    if model.config.kind == "vq":
        raise ValueError(f"{run_dir} is a VQ autoencoder: it reconstructs images; sample from a PGM or MaskGIT run "
                         "trained on its codes")
    from .models import is_image_model

    if is_image_model(model.config):
        return _sample_images(args, run_dir, model)
    if not (run_dir / "tokenizer").is_dir():
        raise ValueError(f"{run_dir} has no tokenizer/ directory, so its samples cannot be turned into text")
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    args.num_samples = args.num_samples or 4
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


def _sample_images(args, run_dir: Path, model) -> int:
    import torch

    from .data import load_prepared
    from .image_generation import known_from_validation, parse_classes, sample_images, save_grid

    data = load_prepared(run_dir)
    if args.known and args.classes:
        raise ValueError("--known completes validation images with their own labels; drop --classes")
    classes = parse_classes(args.classes, data.meta.get("classes", []), model.config.num_classes)
    count = args.num_samples or (2 * len(classes) if not args.known else len(classes))
    if count < 1:
        raise ValueError(f"--num-samples must be positive, got {count}")
    labels = [classes[i % len(classes)] for i in range(count)]
    steps = args.steps or 32
    known = {}
    if args.known:
        codes, cells, labels = known_from_validation(data, count, args.known)
        known = dict(known_codes=codes, known_cells=cells)
    started = time.perf_counter()
    _, images = sample_images(model, data.tokenizer, labels, steps=steps, sampler=args.sampler or "halton",
                              guidance=args.guidance, guidance_schedule=args.guidance_schedule,
                              temperature=args.temperature, seed=args.seed, **known)
    seconds = time.perf_counter() - started
    out = Path(args.out or run_dir / "samples.png")
    columns = len(classes) if not args.known else min(count, 10)
    if args.known:  # originals (through the VQ) above their completions
        originals = data.tokenizer.decode(known["known_codes"]).cpu()
        images = torch.cat([torch.cat([originals[i:i + columns], images[i:i + columns]]) for i in range(0, count, columns)])
    save_grid(images, out, columns=columns)
    names = data.meta.get("classes", [])
    shown = ", ".join(names[c] if c < len(names) else "none" for c in dict.fromkeys(labels))
    print(f"wrote {out}: {count} images ({shown}); {steps} steps of {args.sampler or 'halton'}, guidance "
          f"{args.guidance:g} ({args.guidance_schedule}), {seconds:.2f} s ({count / seconds:.1f} images/s)")
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
    weights = args.weights
    if weights == "ema" and checkpoint.is_dir() and not (checkpoint / "ema.safetensors").is_file():
        weights = "raw (the run kept no EMA)"
    print(f"run {run_dir} ({config.model.kind}, {checkpoint.name}, {weights} weights)")
    from .models import is_image_model

    if config.model.kind == "vq" or is_image_model(config.model):
        return _eval_images(args, config, model, data, device)
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
        num_samples = args.num_samples or 64
        generated = generative_perplexity(model, data.tokenizer, evaluator, num_samples=num_samples, steps=steps,
                                          batch_size=args.sample_batch_size, sampler=args.sampler, seed=args.seed)
        print(f"generative perplexity {generated.perplexity:.2f} under {evaluator.name} "
              f"({num_samples} samples, {steps} steps, {generated.evaluator_tokens} evaluator tokens)")
        print(f"sample entropy {generated.entropy:.3f} nats; sampling {generated.tokens_per_s:.0f} generated tokens/s")
    return 0


def _eval_images(args, config, model, data, device) -> int:
    import torch

    from .eval import validation_elbo
    from .objectives import objective_for
    from .objectives.image import psnr

    vq = config.model.kind == "vq"
    if args.passes > 0:
        indices = range(min(args.rows, len(data.val))) if args.rows else None
        passes = 1 if vq else args.passes
        result = validation_elbo(model, objective_for(model), data.val, indices=indices, batch_size=args.batch_size,
                                 passes=passes, seed=args.seed, device=device,
                                 bos_always_clean=config.train.bos_always_clean)
        if vq:
            print(f"validation: {len(indices or data.val)} images; MSE {result.nll:.5f} per pixel on [-1, 1], "
                  f"PSNR {psnr(result.nll):.2f} dB")
        else:
            spread = f" +- {result.stderr:.4f}" if passes > 1 else ""
            print(f"validation: {result.tokens} codes x {passes} passes; cross-entropy {result.nll:.4f}{spread} "
                  f"nats/code")
    if vq:
        from .data.image_tokens import VQTokenizer, split_images
        from .models.vq import code_statistics

        images, _, _ = split_images(config.data, train_split=False)
        codes = torch.as_tensor(VQTokenizer(model).encode(images)[:, 1:])
        usage, perplexity = code_statistics(codes, config.model.codebook_size)
        print(f"codebook: {100 * usage:.1f}% of {config.model.codebook_size} codes used on the validation images, "
              f"code perplexity {perplexity:.1f}")
    if args.fid or args.inception:
        extractor, metric = _feature_extractor(args, device)
        if vq:
            from .data.images import to_unit_range
            from .eval.fid import fd_classifier
            from .image_generation import decode_in_batches

            scores = fd_classifier(extractor, to_unit_range(images), decode_in_batches(VQTokenizer(model), codes))
            print(f"{metric} of the reconstructions of the {len(images)} validation images: "
                  f"{scores['fd_classifier']:.3f}")
            return 0
        from .image_generation import evaluate_images

        steps = args.steps or 32
        scores = evaluate_images(model, data.tokenizer, data, config.data, extractor,
                                 num_samples=args.num_samples or 1000, steps=steps, sampler=args.sampler or "halton",
                                 guidance=args.guidance, guidance_schedule=args.guidance_schedule, seed=args.seed,
                                 batch_size=args.sample_batch_size, temperature=args.temperature)
        print(f"{metric} {scores['fd']:.3f}, IS {scores['is']:.2f}: {scores['num_samples']} samples ({steps} steps, "
              f"{args.sampler or 'halton'}, guidance {args.guidance:g}, temperature {args.temperature:g}) vs "
              f"{scores['real_images']} real validation images; sampling {scores['images_per_s']:.1f} images/s")
        print(f"VQ floor: {metric} {scores['vq_floor_fd']:.3f}, IS {scores['vq_floor_is']:.2f} for the VQ "
              f"reconstructions of the same validation images")
    return 0


def _feature_extractor(args, device):
    """(the network whose features the Frechet distance compares, the metric's name)."""
    if args.inception:
        from .eval.fid import InceptionFeatures

        return InceptionFeatures(args.inception).to(device), "FID (Inception-v3)"
    from .hub import load_pretrained_dir

    classifier, _ = load_pretrained_dir(Path(args.classifier))
    if classifier.config.kind != "classifier":
        raise ValueError(f"{args.classifier} holds a {classifier.config.kind} model, not the feature classifier "
                         "(train one with pgm fid-classifier)")
    return classifier.to(device), "FD (classifier features)"


def cmd_fid_classifier(args) -> int:
    from .data.images import fit_size, load_fashion_mnist
    from .eval.fid import train_classifier

    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    model, accuracy = train_classifier(fit_size(train_images, 32), train_labels, fit_size(test_images, 32),
                                       test_labels, epochs=args.epochs, seed=args.seed)
    out = Path(args.out)
    model.save_pretrained(out)
    print(f"wrote {out}: test accuracy {100 * accuracy:.2f}% on the 10,000 Fashion-MNIST test images; its features "
          f"give `pgm eval RUN --fid` its FD (classifier features), which is not comparable to Inception FID")
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
    if args.what == "images":
        report = bench.bench_images(steps_list=args.steps or [32], batch=args.batch_size or 32, repeats=args.repeats,
                                    warmup=args.warmup, device=args.device, sampler=args.sampler)
        print(bench.format_images_table(report))
        path = bench.write_report(report, out_dir, "images")
    elif args.what == "sampling":
        shape = bench.Shape(hidden=args.hidden, heads=args.heads, pgm_encoder=args.pgm_blocks[0],
                            pgm_decoder=args.pgm_blocks[1], baseline_blocks=args.baseline_blocks, vocab=args.vocab)
        report = bench.bench_sampling(lengths=args.lengths, steps_list=args.steps or [64], batch=args.batch_size or 8,
                                      shape=shape, repeats=args.repeats, warmup=args.warmup, device=args.device,
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
    sample.add_argument("--num-samples", type=int, help="default: 4 texts; 2 images per class")
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
                                          "paper's MDLM); ar: kv-cache, no-cache; images: halton (default), "
                                          "confidence")
    sample.add_argument("--classes", nargs="+", metavar="CLASS",
                        help="images: class numbers or names, cycled over the samples (none = unconditional)")
    sample.add_argument("--guidance", type=float, default=0.0, help="images: classifier-free guidance weight w")
    sample.add_argument("--guidance-schedule", choices=("linear", "constant"), default="linear",
                        help="images: ramp w up from 0 over the steps (the authors') or keep it constant")
    sample.add_argument("--known", choices=("top", "bottom", "left", "right", "border", "center"),
                        help="images: complete the run's first validation images from this region of them "
                             "(border: inpaint the centre; center: outpaint the border)")
    sample.add_argument("--out", help="images: the PNG grid to write (default RUN/samples.png)")
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
    evaluate.add_argument("--num-samples", type=int,
                          help="generative perplexity: samples to draw (default 64); images (--fid): images to "
                               "generate (default 1000)")
    evaluate.add_argument("--steps", type=int, help="generative perplexity: decoding steps (default min(L-1, 128))")
    evaluate.add_argument("--sampler", help="generative perplexity: the sampler (as in pgm sample)")
    evaluate.add_argument("--sample-batch-size", type=int, default=32)
    evaluate.add_argument("--fid", action="store_true",
                          help="images: FD and IS under the in-repo classifier's features (not Inception FID)")
    evaluate.add_argument("--classifier", default="runs/fid-classifier",
                          help="images: the feature classifier (train it with pgm fid-classifier)")
    evaluate.add_argument("--inception", metavar="WEIGHTS",
                          help="images: the standard FID instead, with torch-fidelity's Inception-v3 weights from this "
                               "local file (pip install torch-fidelity)")
    evaluate.add_argument("--guidance", type=float, default=0.0, help="images: classifier-free guidance weight")
    evaluate.add_argument("--guidance-schedule", choices=("linear", "constant"), default="linear")
    evaluate.add_argument("--temperature", type=float, default=1.0, help="images: sampling temperature")
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

    classifier = commands.add_parser("fid-classifier", help="train the Fashion-MNIST classifier whose features "
                                                              "pgm eval --fid uses")
    classifier.add_argument("--out", default="runs/fid-classifier")
    classifier.add_argument("--epochs", type=int, default=2)
    classifier.add_argument("--seed", type=int, default=0)
    classifier.set_defaults(handler=cmd_fid_classifier)

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
    bench.add_argument("what", choices=("sampling", "training", "images"))
    bench.add_argument("--lengths", type=int, nargs="+", default=[256], help="sampling: sequence lengths")
    bench.add_argument("--steps", type=int, nargs="+", help="sampling: step counts (default 64); images: 32")
    bench.add_argument("--batch-size", type=int, help="sampling: default 8; images: 32 (batch 1 is timed too)")
    bench.add_argument("--sampler", default="halton", choices=("halton", "confidence"), help="images: the sampler")
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
    keep_freed_memory()
    try:
        return args.handler(args)
    except (ValueError, OSError, ImportError) as error:
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
